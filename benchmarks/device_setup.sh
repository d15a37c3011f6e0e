# Source at the start of a run on the lent GPU machine (see docs/benchmarks.md): installs the wheels carried in .whl
# (jsonargparse, soundfile and their needs, absent from that image) and mmgen itself, and points at carried data.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 MMGEN_DATA_DIR=$PWD/.devdata
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING" || true
# The lent image sets PYTHONDONTWRITEBYTECODE=1 and ships no .pyc files, so every process compiles torch, lightning
# and their imports from source (~17 s before `import lightning.pytorch` returns). MMGEN_BYTECOMPILE=1 byte-compiles
# the installed packages once, as a normal pip install does, and lets Python keep its bytecode.
if [ -n "$MMGEN_BYTECOMPILE" ]; then
    unset PYTHONDONTWRITEBYTECODE
    python3 -m compileall -q -j 0 "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
        /tmp/site mmgen plugins >/dev/null 2>&1
fi
