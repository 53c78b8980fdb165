"""An UNMODIFIED program using Google's google-auth for Python, served by
token-broker's metadata endpoint. Nothing here knows about the broker: only
the environment points the library at it.

    GCE_METADATA_HOST=127.0.0.1:8181 GCE_METADATA_IP=127.0.0.1:8181 \\
        python google_auth_client.py AUDIENCE [SCOPE...]

Both variables must be set before google-auth is imported, and
GOOGLE_APPLICATION_CREDENTIALS must be unset. Prints one JSON line: the
project id `google.auth.default()` found, an access token with its expiry,
and an ID token for AUDIENCE, each fetched the way the library always does.
"""

import json
import sys

import google.auth
import google.auth.transport.requests
import google.oauth2.id_token


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: google_auth_client.py AUDIENCE [SCOPE...]", file=sys.stderr)
        return 2
    audience, scopes = sys.argv[1], sys.argv[2:]
    request = google.auth.transport.requests.Request()
    credentials, project_id = google.auth.default(scopes=scopes or None)
    credentials.refresh(request)
    id_token = google.oauth2.id_token.fetch_id_token(request, audience)
    print(
        json.dumps(
            {
                "credentials": type(credentials).__module__ + "." + type(credentials).__name__,
                "project_id": project_id,
                "service_account_email": credentials.service_account_email,
                "universe_domain": credentials.universe_domain,
                "access_token": credentials.token,
                "expiry": credentials.expiry.isoformat() if credentials.expiry else None,
                "id_token": id_token,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
