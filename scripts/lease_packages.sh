# Sourced by the GPU lease scripts (gpu_lease.sh, gpu_performance.sh): installs what the GPU image lacks from
# $WHEELS (default .whl, carried by the device tool) into /tmp/site and puts it on PYTHONPATH: wheels, and archives of
# an installed package's files (*.tar.xz: SimpleITK, whose wheel alone is over the carry limit; how to make one:
# the header of gpu_performance.sh). Nothing happens where the folder holds neither.
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" > /dev/null || compgen -G "$WHEELS/*.tar.xz" > /dev/null; then
    mkdir -p /tmp/site
    if compgen -G "$WHEELS/*.whl" > /dev/null; then
        ${PY:-python3} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
            "$WHEELS"/*.whl || exit 1
    fi
    for archive in "$WHEELS"/*.tar.xz; do [[ -f $archive ]] && { tar -C /tmp/site -xJf "$archive" || exit 1; }; done
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
