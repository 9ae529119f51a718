FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY stream_app ./stream_app
RUN pip install --no-cache-dir -c constraints.txt .
ENV STREAM_APP_DATA_DIR=/var/lib/stream-app
CMD ["stream-app", "worker"]
