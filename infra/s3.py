"""The one way this project makes an S3 client (boto3, path-style addressing, few retries)."""

from __future__ import annotations


def client(endpoint: str | None, region: str, keys: tuple[str, str] | None):
    """A boto3 S3 client; keys None: boto3's own credential chain."""
    import boto3
    from botocore.config import Config

    creds = {"aws_access_key_id": keys[0], "aws_secret_access_key": keys[1]} if keys else {}
    return boto3.client("s3", endpoint_url=endpoint, region_name=region,
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}), **creds)
