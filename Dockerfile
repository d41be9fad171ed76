# One image for every Diptych role; docker-compose.yml picks the role by command (and gives each its healthcheck).
FROM python:3.11-slim
WORKDIR /app
ARG TORCH_SPEC=torch==2.13.0
# Dependencies first, in a layer that changes only with pyproject.toml: torch (pinned, so the wide range in
# pyproject.toml resolves to it), then the runtime requirements read from pyproject.toml.
COPY pyproject.toml ./
RUN pip install --no-cache-dir "$TORCH_SPEC" \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
       > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt
# The source, then the package itself without touching the dependencies.
COPY README.md ./
COPY diptych diptych
COPY proto proto
COPY cluster cluster
COPY engine engine
COPY policies policies
COPY services services
COPY sim sim
COPY workloads workloads
COPY metrics metrics
COPY experiments experiments
COPY benchmarks benchmarks
RUN pip install --no-cache-dir --no-deps . && diptych --help > /dev/null
ENV DIPTYCH_CACHE=/cache PYTHONUNBUFFERED=1 DIPTYCH_HEALTH_URL=http://127.0.0.1:8000/health
# The frontend's /health: 200 once the coordinator has workers for both pools (each registers only when warm), 503
# before. Other roles serve no HTTP: docker-compose.yml gives them their own checks.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(os.environ['DIPTYCH_HEALTH_URL'], timeout=4)"
ENTRYPOINT ["diptych"]
