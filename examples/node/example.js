'use strict';
// token-broker from Node: fetch or watch an ID token over the socket.
//
//   node example.js fetch https://api.example.com [--identity NAME] [--min-valid 600]
//   node example.js watch https://api.example.com [--count 3]
//
// Prints one JSON object per token. On error, prints the gRPC status and the
// broker's message (`error: INVALID_ARGUMENT (3): audience is empty`) and
// exits 1.

const { TokenBrokerClient, TokenBrokerError } = require('./index');

function parse(argv) {
  const [command, audience, ...rest] = argv;
  const options = { count: 0 };
  for (let i = 0; i < rest.length; i += 2) {
    const [flag, value] = [rest[i], rest[i + 1]];
    if (flag === '--identity') options.identity = value;
    else if (flag === '--min-valid') options.minValidForSeconds = Number(value);
    else if (flag === '--count') options.count = Number(value);
    else if (flag === '--socket') options.socket = value;
    else throw new Error(`unknown option ${flag}`);
  }
  if (!['fetch', 'watch'].includes(command) || audience === undefined) {
    throw new Error('usage: node example.js fetch|watch AUDIENCE [--identity NAME] [--min-valid S] [--count N]');
  }
  return { command, audience, options };
}

function show(token) {
  console.log(JSON.stringify({
    identity: token.identity,
    audience: token.audience,
    expire_time: token.expireTime.toISOString(),
    issue_time: token.issueTime.toISOString(),
    token: token.token,
  }));
}

async function main() {
  const { command, audience, options } = parse(process.argv.slice(2));
  const broker = new TokenBrokerClient(options.socket);
  try {
    if (command === 'fetch') {
      show(await broker.getIdToken(audience, options));
    } else {
      let seen = 0;
      for await (const token of broker.watchIdToken(audience, options)) {
        show(token);
        seen += 1;
        if (options.count && seen >= options.count) break;
      }
    }
    return 0;
  } catch (err) {
    if (err instanceof TokenBrokerError) {
      console.error(`error: ${err.codeName} (${err.code}): ${err.details}`);
      return 1;
    }
    throw err;
  } finally {
    broker.close();
  }
}

main().then((code) => { process.exitCode = code; }, (err) => {
  console.error(err.message);
  process.exitCode = 2;
});
