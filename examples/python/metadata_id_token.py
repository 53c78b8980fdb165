"""An UNMODIFIED program using Google's own library, google-auth, served by
token-broker's metadata-compatible endpoint. Nothing here knows about the
broker: only the environment points the library at it.

    GCE_METADATA_HOST=127.0.0.1:8181 GCE_METADATA_IP=127.0.0.1:8181 \\
        python metadata_id_token.py https://api.example.com

Both variables must be set before google-auth is imported (it reads them at
import), and GOOGLE_APPLICATION_CREDENTIALS must be unset (it would win).
Prints the verified token's claims as JSON. `--certs-url` verifies against
another issuer's certs (the emulator's in tests); the default is Google's.
"""

import argparse
import json
import sys

import google.auth.transport.requests
import google.oauth2.id_token


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("audience")
    parser.add_argument("--certs-url", help="PEM certs to verify with (default: Google's)")
    args = parser.parse_args()

    request = google.auth.transport.requests.Request()
    token = google.oauth2.id_token.fetch_id_token(request, args.audience)
    verify = {"certs_url": args.certs_url} if args.certs_url else {}
    claims = google.oauth2.id_token.verify_token(
        token, request, audience=args.audience, **verify
    )
    print(json.dumps(claims))
    return 0


if __name__ == "__main__":
    sys.exit(main())
