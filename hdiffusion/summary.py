"""`python -m hdiffusion.summary --config C`: parameters and forward GMAC per image, as one JSON line.

Needs no data and does no training; the model is built on the CPU and counted analytically.
"""

import argparse
import json
import sys

from .errors import UsageError


def summarize(config):
    from .flops import count_macs
    from .models import make_model

    model_config = config["model"]
    model = make_model(model_config, config["dataset"]["num_classes"])
    shape = (model_config["input_channels"], *model_config["input_size"])
    return {
        "type": model_config["type"],
        "input_size": model_config["input_size"],
        "params": sum(p.numel() for p in model.parameters()),
        "gmac": round(count_macs(model, shape) / 1e9, 4),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m hdiffusion.summary", description=__doc__)
    parser.add_argument("--config", required=True, help="a JSON config file")
    args = parser.parse_args(argv)
    from .config import load_config

    try:
        summary = dict(config=args.config, **summarize(load_config(args.config)))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
