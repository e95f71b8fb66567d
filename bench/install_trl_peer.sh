#!/usr/bin/env bash
# Install the TRL peer of bench/rl_iteration.py (trl, datasets, dill, multiprocess, pyarrow) from local wheels into
# a folder of its own, beside an environment that already has torch, transformers and accelerate:
#
#   source bench/install_trl_peer.sh [WHEEL_DIR=.whl] [PREFIX=/tmp/trl_peer]
#
# It installs into PREFIX/site-packages and puts that folder first on PYTHONPATH. The folder name matters:
# `datasets` fingerprints every new Dataset with dill, and dill pickles a module by reference only when the
# module's file lies under sys.prefix or in a path containing "site-packages"; from any other folder (e.g.
# `pip install --target /tmp/site`) it pickles pyarrow's whole module by value, which fails on pyarrow's
# MonthDayNano type ("Can't pickle <class 'MonthDayNano'>"). A virtual environment works for the same reason.
wheels=${1:-.whl}
prefix=${2:-/tmp/trl_peer}
python3 -m pip install --quiet --no-index --no-deps --target "$prefix/site-packages" \
    "$wheels"/trl-*.whl "$wheels"/datasets-*.whl "$wheels"/dill-*.whl "$wheels"/multiprocess-*.whl \
    "$wheels"/pyarrow-*.whl || return 1 2>/dev/null || exit 1
export PYTHONPATH="$prefix/site-packages${PYTHONPATH:+:$PYTHONPATH}"
