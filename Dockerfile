# One image for every Diptych role; docker-compose.yml picks the role by command.
FROM python:3.11-slim
WORKDIR /app
ARG TORCH_SPEC=torch==2.13.0
COPY pyproject.toml README.md ./
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
RUN pip install --no-cache-dir "$TORCH_SPEC" && pip install --no-cache-dir .
ENV DIPTYCH_CACHE=/cache PYTHONUNBUFFERED=1
ENTRYPOINT ["diptych"]
