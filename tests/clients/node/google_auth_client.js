// An UNMODIFIED program using Google's google-auth-library for Node, served
// by token-broker's metadata endpoint. Nothing here knows about the broker:
// only GCE_METADATA_HOST (and GCE_METADATA_IP) point the library at it.
//
//   GCE_METADATA_HOST=127.0.0.1:8181 node google_auth_client.js AUDIENCE [SCOPE...]
//
// Prints one JSON line: the project id, an access token with its expiry, and
// an ID token for AUDIENCE, each fetched the way the library always does.
'use strict';

const {GoogleAuth} = require('google-auth-library');

async function main() {
  const [audience, ...scopes] = process.argv.slice(2);
  if (!audience) {
    throw new Error('usage: google_auth_client.js AUDIENCE [SCOPE...]');
  }
  const auth = new GoogleAuth(scopes.length ? {scopes} : {});
  const projectId = await auth.getProjectId();
  const client = await auth.getClient();
  const access = await client.getAccessToken();
  const idClient = await auth.getIdTokenClient(audience);
  const idToken = await idClient.idTokenProvider.fetchIdToken(audience);
  const universeDomain = await auth.getUniverseDomain();
  console.log(
    JSON.stringify({
      client: client.constructor.name,
      project_id: projectId,
      universe_domain: universeDomain,
      access_token: access.token,
      expiry_date: client.credentials.expiry_date,
      id_token: idToken,
    }),
  );
}

main().catch(err => {
  console.error(`google-auth-library failed: ${err && err.stack ? err.stack : err}`);
  process.exit(1);
});
