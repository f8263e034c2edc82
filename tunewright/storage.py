"""Object storage shared by stages: S3 prefixes fetched into a local cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tunewright.files import atomic_folder


def fetch_s3(uri: str, cache: Path, log, what: str = "s3") -> Path:
    """Download an S3 object or prefix into the cache, keyed by the objects' keys and ETags.

    The endpoint and credentials come from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    ...), so any S3-compatible store works. An unchanged prefix is not downloaded again.
    """
    import boto3

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3")
    objects = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        objects += [o for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    if not objects:
        raise FileNotFoundError(f"{what}: nothing at {uri}")
    key = hashlib.sha256(json.dumps(sorted((o["Key"], o["ETag"]) for o in objects)).encode()).hexdigest()[:16]
    single = len(objects) == 1 and objects[0]["Key"] == prefix
    target = cache / f"s3-{key}"
    if not target.exists():
        with atomic_folder(target) as tmp:
            for obj in objects:
                rel = Path(obj["Key"]).name if single else Path(obj["Key"][len(prefix):].lstrip("/"))
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, obj["Key"], str(dest))
            log.info("downloaded %d objects (%.1f MB) from %s", len(objects), sum(o["Size"] for o in objects) / 1e6,
                     uri)
    return target / Path(prefix).name if single else target
