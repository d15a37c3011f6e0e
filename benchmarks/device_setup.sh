# Source at the start of a run on the lent GPU machine (see docs/benchmarks.md): installs the wheels carried in .whl
# (jsonargparse, soundfile and their needs, absent from that image) and mmgen itself, and points at carried data.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 MMGEN_DATA_DIR=$PWD/.devdata
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING" || true
