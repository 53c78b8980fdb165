"""token-broker from Python: fetch or watch an ID token over the socket.

    python example.py fetch https://api.example.com [--identity NAME] [--min-valid 600]
    python example.py watch https://api.example.com [--count 3]

Prints one JSON object per token. On error, prints the gRPC status and the
broker's message (`error: INVALID_ARGUMENT: audience is empty`) and exits 1.
"""

import argparse
import itertools
import json
import sys

from token_broker_client import IdToken, TokenBrokerClient, TokenBrokerError


def show(token: IdToken) -> None:
    print(
        json.dumps(
            {
                "identity": token.identity,
                "audience": token.audience,
                "expire_time": token.expire_time.isoformat(),
                "issue_time": token.issue_time.isoformat(),
                "token": token.token,
            }
        ),
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["fetch", "watch"])
    parser.add_argument("audience")
    parser.add_argument("--identity")
    parser.add_argument("--min-valid", type=float, help="seconds of life the token must have")
    parser.add_argument("--count", type=int, default=0, help="watch: stop after N tokens")
    parser.add_argument("--socket", help="default: $TOKEN_BROKER_SOCKET")
    args = parser.parse_args()

    with TokenBrokerClient(args.socket) as client:
        try:
            if args.command == "fetch":
                show(client.get_id_token(args.audience, args.identity, args.min_valid))
            else:
                tokens = client.watch_id_token(args.audience, args.identity, args.min_valid)
                if args.count:
                    tokens = itertools.islice(tokens, args.count)
                for token in tokens:
                    show(token)
        except TokenBrokerError as error:
            print(f"error: {error.code.name}: {error.message}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
