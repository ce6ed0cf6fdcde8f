/**
 * The peer listener: gRPC over HTTP/2 with mutual TLS on TCP, for other nodes' drivers only (no plaintext:
 * a client without a certificate from the peer CA fails the handshake before any request is read). Every
 * reply is stamped with this node's ID as a header and a trailer, so callers can tell the owner's statuses
 * from their transport's (peer-client.ts).
 */
import http2 from 'node:http2';
import type { AddressInfo, Socket } from 'node:net';
import type { Logger } from '../logging.js';
import { EXACT_MESSAGE_TRAILER, NODE_HEADER } from './peer-protocol.js';
import { type PeerTls, peerServerOptions } from './peer-tls.js';

export interface PeerListenAddress {
  host: string;
  /** 0: any free port (tests). */
  port: number;
}

export interface PeerServer {
  /** Where it listens (the bound port). */
  readonly address: PeerListenAddress;
  /** Takes no new calls; resolves when the calls in flight have finished. */
  drain(): Promise<void>;
  /** Ends whatever is left at once. */
  destroy(): void;
}

export async function startPeerServer(options: {
  listen: PeerListenAddress;
  tls: PeerTls;
  nodeId: string;
  handle: (req: http2.Http2ServerRequest, res: http2.Http2ServerResponse) => void;
  logger: Logger;
}): Promise<PeerServer> {
  const { nodeId, logger } = options;
  const server = http2.createSecureServer(peerServerOptions(options.tls), (req, res) => {
    res.setHeader(NODE_HEADER, nodeId);
    const addTrailers = res.addTrailers.bind(res);
    res.addTrailers = (trailers: http2.OutgoingHttpHeaders) =>
      addTrailers({ ...trailers, ...exactMessage(trailers), [NODE_HEADER]: nodeId });
    options.handle(req, res);
  });
  // Replies are several small writes (headers, messages, trailers): without this, Nagle's algorithm holds each
  // one back until the last is acknowledged, and the peer's delayed ACK adds up to 40 ms a call.
  server.on('connection', (socket: Socket) => socket.setNoDelay(true));
  // A peer without a valid certificate is turned away in the handshake; say so once per attempt, at debug.
  server.on('tlsClientError', (err: Error, socket) => {
    logger.debug({ from: socket.remoteAddress, err: err.message }, 'peer connection refused in the TLS handshake');
  });
  const sessions = new Set<http2.ServerHttp2Session>();
  server.on('session', (session) => {
    sessions.add(session);
    session.once('close', () => sessions.delete(session));
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.listen.port, options.listen.host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const bound = server.address() as AddressInfo;
  const address = { host: options.listen.host, port: bound.port };
  logger.info({ peerListen: `${address.host}:${address.port}` }, 'peer listener ready (mutual TLS)');
  let drained: Promise<void> | undefined;
  return {
    address,
    drain() {
      drained ??= new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const session of sessions) session.close();
      });
      return drained;
    },
    destroy() {
      for (const session of sessions) session.destroy();
    },
  };
}

/**
 * The status message again, byte for byte: grpc-message is percent-encoded, and grpc-js (the peer client)
 * undoes only part of that encoding, so a message with ',' or ':' would come out changed.
 */
function exactMessage(trailers: http2.OutgoingHttpHeaders): http2.OutgoingHttpHeaders {
  const encoded = trailers['grpc-message'];
  if (typeof encoded !== 'string') return {};
  try {
    return { [EXACT_MESSAGE_TRAILER]: Buffer.from(decodeURIComponent(encoded), 'utf8').toString('base64') };
  } catch {
    return {};
  }
}
