/**
 * The CSI-direct transport: the driver's own gRPC socket (`unix:///…/csi.sock`, or `tcp://host:port` on
 * loopback), over connect-node's HTTP/2 client. Requests are the generated CSI messages; responses are
 * decoded from their bytes (metadata-wire.ts), not through message objects, which is what lets a listing
 * run at millions of extents a second. For local use and tests; in a cluster the sidecar stands in front
 * of the driver instead.
 */
import type http2 from 'node:http2';
import net from 'node:net';
import { create, toBinary } from '@bufbuild/protobuf';
import { Code, ConnectError } from '@connectrpc/connect';
import { createNodeHttpClient, Http2SessionManager } from '@connectrpc/connect-node';
import { createMethodUrl, type UniversalClientFn } from '@connectrpc/connect/protocol';
import {
  BlockMetadataType as WireType,
  GetMetadataAllocatedRequestSchema,
  GetMetadataDeltaRequestSchema,
  SnapshotMetadata,
} from '../gen/csi/v1/csi_pb.js';
import { rawServerStream } from './grpc-raw-stream.js';
import { EndpointError } from './errors.js';
import { decodeMetadataResponse } from './metadata-wire.js';
import type { BlockMetadataType, MetadataPage, MetadataRequest, MetadataTransport } from './types.js';

const BASE_URL = 'http://localhost';

/** HTTP/2 over a unix socket or TCP, from a CSI endpoint string. */
export function endpointSession(endpoint: string): Http2SessionManager {
  if (endpoint.startsWith('tcp://')) {
    // Requests are made to BASE_URL, as over a unix socket; the connection goes to HOST:PORT. (A session
    // made for http://HOST:PORT refused every request to BASE_URL as for another authority.)
    let url: URL;
    try {
      url = new URL(`http://${endpoint.slice('tcp://'.length)}`);
    } catch {
      throw new EndpointError(`endpoint ${endpoint}: expected tcp://HOST:PORT`);
    }
    if (!url.port || url.pathname !== '/') throw new EndpointError(`endpoint ${endpoint}: expected tcp://HOST:PORT`);
    const host = url.hostname.replace(/^\[(.*)\]$/, '$1');
    const port = Number(url.port);
    const options: http2.ClientSessionOptions = { createConnection: () => net.connect({ host, port }) };
    return new Http2SessionManager(BASE_URL, { pingIntervalMs: 30_000 }, options);
  }
  let socket = endpoint;
  if (endpoint.startsWith('unix://')) socket = endpoint.slice('unix://'.length);
  else if (endpoint.startsWith('unix:')) socket = endpoint.slice('unix:'.length);
  else if (/^[a-z]+:\/\//i.test(endpoint))
    throw new EndpointError(`endpoint ${endpoint}: expected unix:///path/csi.sock or tcp://HOST:PORT`);
  if (!socket) throw new EndpointError(`endpoint ${endpoint}: the socket path is empty`);
  const options: http2.ClientSessionOptions = { createConnection: () => net.connect(socket) };
  return new Http2SessionManager(BASE_URL, { pingIntervalMs: 30_000 }, options);
}

export class CsiDirectTransport implements MetadataTransport {
  private readonly session: Http2SessionManager;
  private readonly http: UniversalClientFn;

  constructor(endpoint: string) {
    this.session = endpointSession(endpoint);
    this.http = createNodeHttpClient({ httpVersion: '2', sessionProvider: () => this.session });
  }

  async *open(request: MetadataRequest, signal: AbortSignal): AsyncIterable<MetadataPage> {
    try {
      yield* this.stream(request, signal);
    } catch (err) {
      throw signal.aborted ? err : asUnavailable(err, 'the driver');
    }
  }

  private async *stream(request: MetadataRequest, signal: AbortSignal): AsyncIterable<MetadataPage> {
    const [method, body] =
      request.kind === 'allocated'
        ? [
            SnapshotMetadata.method.getMetadataAllocated,
            toBinary(
              GetMetadataAllocatedRequestSchema,
              create(GetMetadataAllocatedRequestSchema, {
                snapshotId: request.snapshot,
                startingOffset: BigInt(request.startingOffset),
                maxResults: request.maxResults,
              }),
            ),
          ]
        : [
            SnapshotMetadata.method.getMetadataDelta,
            toBinary(
              GetMetadataDeltaRequestSchema,
              create(GetMetadataDeltaRequestSchema, {
                baseSnapshotId: request.base,
                targetSnapshotId: request.target,
                startingOffset: BigInt(request.startingOffset),
                maxResults: request.maxResults,
              }),
            ),
          ];
    for await (const bytes of rawServerStream(this.http, createMethodUrl(BASE_URL, method), body, signal)) {
      const res = decodeMetadataResponse(bytes);
      yield {
        blockMetadataType: styleOf(res.blockMetadataType),
        capacityBytes: res.volumeCapacityBytes,
        tuples: res.tuples,
      };
    }
  }

  close(): void {
    this.session.abort();
  }
}

export function styleOf(type: WireType): BlockMetadataType {
  return type === WireType.FIXED_LENGTH ? 'FIXED_LENGTH' : 'VARIABLE_LENGTH';
}

/** Tuples as [offset, length, offset, length, …] (the CSI and the Kubernetes messages share the shape). */
export function flatten(list: readonly { byteOffset: bigint; sizeBytes: bigint }[]): Float64Array {
  const out = new Float64Array(list.length * 2);
  for (let i = 0; i < list.length; i++) {
    out[2 * i] = Number(list[i]!.byteOffset);
    out[2 * i + 1] = Number(list[i]!.sizeBytes);
  }
  return out;
}

/** Socket errors that mean the driver went away (restart, crash) rather than refused the call. */
const CONNECTION_LOST = new Set([
  'ECONNRESET',
  'EPIPE',
  'ECONNREFUSED',
  'ENOENT',
  'ERR_HTTP2_STREAM_ERROR',
  'ERR_HTTP2_GOAWAY_SESSION',
  'ERR_HTTP2_SESSION_ERROR',
]);

/**
 * connect-node reports a connection reset mid-stream as ABORTED; for a client it is the server (`peer`:
 * the driver, or the sidecar in front of it) being unreachable, UNAVAILABLE, which the client resumes.
 */
export function asUnavailable(err: unknown, peer: string): unknown {
  if (!(err instanceof ConnectError) || err.code === Code.Unavailable) return err;
  const cause = err.cause as NodeJS.ErrnoException | undefined;
  const lost =
    (cause?.code !== undefined && CONNECTION_LOST.has(cause.code)) ||
    /ECONNRESET|EPIPE|ECONNREFUSED/.test(err.rawMessage);
  return lost
    ? new ConnectError(`connection to ${peer} lost: ${err.rawMessage}`, Code.Unavailable, undefined, undefined, err)
    : err;
}
