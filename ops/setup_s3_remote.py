"""Point this repository's DVC remote at S3 or an S3-compatible store; make the bucket.

    python -m ops.setup_s3_remote s3://my-bucket/knapsack-rl \
        --endpoint-url http://127.0.0.1:8333 --create-bucket

Writes the remote (URL, and the endpoint and region when given) to `.dvc/config`, which
is committed, as the default remote. Credentials are never written there: they stay in
the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), or `--save-credentials`
copies them from the environment into `.dvc/config.local`, which git ignores.

Leave `--endpoint-url` out for AWS itself, or when the endpoint differs from machine to
machine (e.g. http://minio:9000 inside docker/compose.yaml, http://127.0.0.1:9000 on the
host): then each machine sets AWS_ENDPOINT_URL, which DVC, s3fs and MLflow all read.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline_lib.adapters.dvc_remote import (
    DEFAULT_REMOTE,
    S3Remote,
    StorageError,
    configure_dvc_remote,
    ensure_bucket,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="s3://bucket/prefix")
    parser.add_argument("--name", default=DEFAULT_REMOTE, help="remote name (default: %(default)s)")
    parser.add_argument(
        "--endpoint-url",
        help="S3-compatible endpoint to commit, e.g. http://127.0.0.1:8333 "
        "(default: none; AWS_ENDPOINT_URL or AWS decide at run time)",
    )
    parser.add_argument("--region", help="region to commit (default: none; AWS_DEFAULT_REGION)")
    parser.add_argument("--create-bucket", action="store_true", help="create the bucket if missing")
    parser.add_argument(
        "--save-credentials",
        action="store_true",
        help="copy AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY into .dvc/config.local (git-ignored)",
    )
    parser.add_argument("--repo", default=".", help="repository root (default: %(default)s)")
    args = parser.parse_args(argv)

    remote = S3Remote(args.url, args.name, args.endpoint_url, args.region)
    keys: dict[str, str] = {}
    if args.save_credentials:
        try:
            keys = {
                "access_key_id": os.environ["AWS_ACCESS_KEY_ID"],
                "secret_access_key": os.environ["AWS_SECRET_ACCESS_KEY"],
            }
        except KeyError as missing:
            parser.error(f"--save-credentials needs {missing.args[0]} in the environment")
    try:
        remote.bucket  # noqa: B018 - validates the URL before anything is written
        if args.create_bucket:
            created = ensure_bucket(
                remote.bucket, endpoint_url=remote.endpoint_url, region=remote.region
            )
            print(f"bucket {remote.bucket}: {'created' if created else 'exists'}")
        configure_dvc_remote(args.repo, remote, **keys)
    except (StorageError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"default DVC {remote.describe()}")
    if keys:
        print("credentials written to .dvc/config.local (not committed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
