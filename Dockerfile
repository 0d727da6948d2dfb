# One image for every vidsim role (worker, GPU worker, beat, migrate).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 VIDSIM_DATA_DIR=/data
WORKDIR /srv/vidsim
COPY pyproject.toml README.md alembic.ini ./
COPY app app
COPY workers workers
COPY scripts scripts
COPY migrations migrations
RUN pip install --disable-pip-version-check -e . \
 && useradd --create-home --uid 1000 vidsim && mkdir -p /data && chown vidsim /data
USER vidsim
VOLUME ["/data"]
ENTRYPOINT ["vidsim"]
CMD ["worker"]
