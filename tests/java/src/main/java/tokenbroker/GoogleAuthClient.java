package tokenbroker;

import com.google.auth.oauth2.AccessToken;
import com.google.auth.oauth2.ComputeEngineCredentials;
import com.google.auth.oauth2.GoogleCredentials;
import com.google.auth.oauth2.IdTokenCredentials;
import com.google.auth.oauth2.IdTokenProvider;
import java.util.Arrays;

/**
 * An UNMODIFIED program using Google's google-auth-library-java, served by
 * token-broker's metadata endpoint. Nothing here knows about the broker: only
 * GCE_METADATA_HOST points the library at it.
 *
 * <pre>GCE_METADATA_HOST=127.0.0.1:8181 mvn -q exec:java -Dexec.args=AUDIENCE</pre>
 *
 * Prints one JSON line: the credentials class Application Default Credentials
 * chose, the account, an access token with its expiry, and an ID token for
 * AUDIENCE, each fetched the way the library always does. (0.18.0 has no
 * project-id lookup: that lives in google-cloud-core's ServiceOptions.)
 */
public final class GoogleAuthClient {
  public static void main(String[] args) throws Exception {
    if (args.length != 1) {
      System.err.println("usage: GoogleAuthClient AUDIENCE");
      System.exit(2);
    }
    String audience = args[0];
    GoogleCredentials credentials = GoogleCredentials.getApplicationDefault();
    credentials.refresh();
    AccessToken access = credentials.getAccessToken();
    String account =
        credentials instanceof ComputeEngineCredentials
            ? ((ComputeEngineCredentials) credentials).getAccount()
            : "";
    IdTokenCredentials idCredentials =
        IdTokenCredentials.newBuilder()
            .setIdTokenProvider((IdTokenProvider) credentials)
            .setTargetAudience(audience)
            .setOptions(Arrays.asList(IdTokenProvider.Option.FORMAT_FULL))
            .build();
    idCredentials.refresh();
    String idToken = idCredentials.getIdToken().getTokenValue();
    System.out.println(
        "{\"credentials\":\"" + credentials.getClass().getName()
            + "\",\"account\":\"" + account
            + "\",\"access_token\":\"" + access.getTokenValue()
            + "\",\"expiration_time_millis\":" + access.getExpirationTime().getTime()
            + ",\"id_token\":\"" + idToken + "\"}");
  }
}
