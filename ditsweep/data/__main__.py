"""`python -m ditsweep.data pack SOURCE DEST ...` and `python -m ditsweep.data verify URI`.

    python -m ditsweep.data pack builtin:photos ./packed/photos32
    python -m ditsweep.data pack /data/celeba/img_align_celeba s3://my-bucket/celeba32 --resolution 32
    python -m ditsweep.data verify s3://my-bucket/celeba32

S3 credentials come from the standard AWS chain; the endpoint from AWS_ENDPOINT_URL_S3 (or
AWS_ENDPOINT_URL), or --endpoint-url.
"""

import argparse
import logging
import os
import sys

from ditsweep.data.errors import DataError, scrub
from ditsweep.data.pack import pack, verify
from ditsweep.data.s3 import MiB, S3Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ditsweep.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pack", help="pack images into WebDataset shards plus a manifest")
    p.add_argument("source", help="builtin:photos, builtin:digits, or a folder of images "
                                  "(flat or one subfolder per class)")
    p.add_argument("dest", help="a local directory or s3://bucket/prefix")
    p.add_argument("--resolution", type=int, default=32, help="side of the square images (32)")
    p.add_argument("--shard-size", type=int, default=5000, help="images per shard (5000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the one fixed shuffle (0)")
    p.add_argument("--name", help="dataset name for the manifest (default: the source's)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes decoding a folder's images (default: all cores)")
    p.add_argument("--limit", type=int, help="pack only this many images, a random subset "
                                             "(the first ones of the seed's shuffle)")
    p.add_argument("--overwrite", action="store_true", help="replace a packed dataset at DEST")
    p.add_argument("--multipart-threshold-mb", type=float,
                   help="upload shards larger than this in parts (default 64)")
    v = commands.add_parser("verify", help="check every shard's sha256 against the manifest")
    v.add_argument("uri", help="a packed dataset: local path, file:// or s3:// URI")
    for sub in (p, v):
        sub.add_argument("--endpoint-url", help="S3 endpoint (default: boto3's lookup: "
                                                "AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, config file)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.endpoint_url:  # boto3 reads it from here, for this process and the ones it starts
        os.environ["AWS_ENDPOINT_URL_S3"] = args.endpoint_url

    try:
        if args.command == "pack":
            settings = S3Settings()
            if args.multipart_threshold_mb is not None:
                settings = S3Settings(multipart_threshold=int(args.multipart_threshold_mb * MiB))
            m = pack(args.source, args.dest, args.resolution, args.shard_size, args.seed,
                     name=args.name, workers=args.workers, limit=args.limit,
                     overwrite=args.overwrite,
                     settings=settings, progress=sys.stderr.isatty())
            print(f"packed {m.count} images of {m.name} at {m.resolution}x{m.resolution} "
                  f"(seed {m.seed}) into {len(m.shards)} shards at {args.dest}")
        else:
            m = verify(args.uri, progress=sys.stderr.isatty())
            print(f"{args.uri}: {len(m.shards)} shards, {m.count} images, every sha256 matches")
    except (DataError, ValueError) as e:
        print(f"error: {scrub(str(e))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
