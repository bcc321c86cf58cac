# shellcheck shell=bash
# Sourced by install.sh and build-wheelhouse.sh (not run on its own).
# copy_source REPO DEST: copy the source tree without VCS data, venvs, caches
# or build outputs, so pip can build from DEST without writing into REPO
# (which may be read-only, and which in-tree builds would litter).
copy_source() {
    tar -C "$1" --exclude=./.git --exclude=./.venv --exclude=./venv --exclude=./build \
        --exclude=./dist --exclude='./*.egg-info' --exclude=./.mypy_cache \
        --exclude=./.ruff_cache --exclude=./.pytest_cache --exclude=./.hypothesis \
        --exclude=./.rehearsal --exclude=./sandbox --exclude=__pycache__ -cf - . \
        | tar -C "$2" -xf -
}
