'use strict';
// A small Node client for token-broker's gRPC API on its Unix socket.
//
//   const { TokenBrokerClient } = require('./index');
//   const broker = new TokenBrokerClient(); // $TOKEN_BROKER_SOCKET
//   const { token } = await broker.getIdToken('https://api.example.com');
//   for await (const t of broker.watchIdToken('https://api.example.com')) use(t.token);
//
// The proto is loaded at run time from proto/ (no code generation).
// Failures reject with a TokenBrokerError whose `code` is the gRPC status
// number, `codeName` its name (INVALID_ARGUMENT, UNAVAILABLE, ...) and
// `details` the broker's message.

const os = require('os');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = process.env.TOKEN_BROKER_PROTO_DIR || path.join(__dirname, '..', '..', 'proto');
const DEFAULT_TIMEOUT_MS = 30000;

const definition = protoLoader.loadSync('tokenbroker/v1/token_broker.proto', {
  includeDirs: [PROTO_ROOT],
  keepCase: false,
  longs: Number,
  enums: String,
  defaults: true,
});
const { TokenBroker } = grpc.loadPackageDefinition(definition).tokenbroker.v1;

const STATUS_NAMES = Object.fromEntries(
  Object.entries(grpc.status).map(([name, code]) => [code, name]),
);

class TokenBrokerError extends Error {
  constructor(code, details) {
    const codeName = STATUS_NAMES[code] || `STATUS_${code}`;
    super(`${codeName}: ${details}`);
    this.name = 'TokenBrokerError';
    this.code = code;
    this.codeName = codeName;
    this.details = details;
  }
}

/** `$TOKEN_BROKER_SOCKET`, else the broker's default path for this user. */
function defaultSocketPath() {
  if (process.env.TOKEN_BROKER_SOCKET) return process.env.TOKEN_BROKER_SOCKET;
  const uid = os.userInfo().uid;
  if (uid === 0) return '/run/token-broker/broker.sock';
  const runtime = process.env.XDG_RUNTIME_DIR || `/run/user/${uid}`;
  return path.join(runtime, 'token-broker.sock');
}

function toDate(ts) {
  return ts ? new Date(Number(ts.seconds) * 1000 + Math.floor(ts.nanos / 1e6)) : null;
}

function fromProto(reply) {
  return {
    token: reply.token,
    expireTime: toDate(reply.expireTime),
    issueTime: toDate(reply.issueTime),
    identity: reply.identity,
    audience: reply.audience,
  };
}

function request(audience, { identity, minValidForSeconds } = {}) {
  const req = { audience, identity: identity || '' };
  if (minValidForSeconds !== undefined && minValidForSeconds !== null) {
    const seconds = Math.floor(minValidForSeconds);
    req.minValidFor = { seconds, nanos: Math.round((minValidForSeconds - seconds) * 1e9) };
  }
  return req;
}

function toError(err) {
  return err && typeof err.code === 'number' ? new TokenBrokerError(err.code, err.details) : err;
}

class TokenBrokerClient {
  /**
   * @param {string} [socketPath] default: $TOKEN_BROKER_SOCKET
   * @param {{timeoutMs?: number}} [options]
   */
  constructor(socketPath, { timeoutMs = DEFAULT_TIMEOUT_MS } = {}) {
    const socket = path.resolve(socketPath || defaultSocketPath());
    this.timeoutMs = timeoutMs;
    // Name a host for HTTP/2 :authority: the broker rejects a socket path there.
    this.stub = new TokenBroker(`unix:${socket}`, grpc.credentials.createInsecure(), {
      'grpc.default_authority': 'localhost',
    });
  }

  /**
   * A token for `audience`.
   * @param {string} audience
   * @param {{identity?: string, minValidForSeconds?: number}} [options]
   */
  getIdToken(audience, options = {}) {
    const deadline = new Date(Date.now() + this.timeoutMs);
    return new Promise((resolve, reject) => {
      this.stub.GetIdToken(request(audience, options), { deadline }, (err, reply) =>
        err ? reject(toError(err)) : resolve(fromProto(reply)),
      );
    });
  }

  /**
   * The current token at once, then each refreshed one, until the loop
   * stops (`break` cancels the stream).
   * @param {string} audience
   * @param {{identity?: string, minValidForSeconds?: number}} [options]
   */
  async *watchIdToken(audience, options = {}) {
    const call = this.stub.WatchIdToken(request(audience, options));
    try {
      for await (const reply of call) {
        yield fromProto(reply);
      }
    } catch (err) {
      throw toError(err);
    } finally {
      call.cancel();
    }
  }

  close() {
    this.stub.close();
  }
}

module.exports = { TokenBrokerClient, TokenBrokerError, defaultSocketPath };
