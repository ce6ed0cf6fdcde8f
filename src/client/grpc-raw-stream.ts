/**
 * A gRPC server-streaming call whose responses come back as their raw bytes, for callers that decode them
 * faster than a generic protobuf decoder can (metadata-wire.ts). Rides on connect-node's HTTP/2 client and
 * connect's gRPC header and trailer checks, so statuses, resets and aborts surface as the same
 * ConnectErrors a generated client would throw; only the message decoding is left to the caller.
 */
import { Code, ConnectError } from '@connectrpc/connect';
import type { UniversalClientFn } from '@connectrpc/connect/protocol';
import { headerEncoding, requestHeader, validateResponse, validateTrailer } from '@connectrpc/connect/protocol-grpc';

/** gRPC's length-prefixed message framing: 1 flag byte, 4 bytes big-endian length. */
const PREFIX = 5;
const FLAG_COMPRESSED = 1;

/** Opens the call, sends `request` (already serialized) and yields each response message's bytes. */
export async function* rawServerStream(
  http: UniversalClientFn,
  url: string,
  request: Uint8Array,
  signal: AbortSignal,
): AsyncGenerator<Uint8Array> {
  const framed = new Uint8Array(PREFIX + request.length);
  new DataView(framed.buffer).setUint32(1, request.length);
  framed.set(request, PREFIX);
  const res = await http({
    url,
    method: 'POST',
    // No grpc-accept-encoding: the server must answer uncompressed.
    header: requestHeader(true, undefined, undefined),
    body: (async function* () {
      yield framed;
    })(),
    signal,
  });
  const { foundStatus, headerError } = validateResponse(res.status, res.header);
  if (headerError) throw headerError;
  const encoding = res.header.get(headerEncoding);
  if (encoding !== null && encoding.toLowerCase() !== 'identity')
    throw new ConnectError(`unsupported response encoding "${encoding}"`, Code.Internal);

  // Chunks of the body not yet made into messages, and how many bytes the next message needs.
  const pending: Uint8Array[] = [];
  let pendingBytes = 0;
  let need = PREFIX;
  for await (const chunk of res.body) {
    pending.push(chunk);
    pendingBytes += chunk.length;
    if (pendingBytes < need) continue;
    const data = pending.length === 1 ? pending[0]! : Buffer.concat(pending, pendingBytes);
    pending.length = 0;
    let pos = 0;
    for (;;) {
      if (data.length - pos < PREFIX) {
        need = PREFIX;
        break;
      }
      const length = data[pos + 1]! * 0x1000000 + ((data[pos + 2]! << 16) | (data[pos + 3]! << 8) | data[pos + 4]!);
      if (data.length - pos - PREFIX < length) {
        need = PREFIX + length;
        break;
      }
      if (data[pos]! & FLAG_COMPRESSED)
        throw new ConnectError('protocol error: a compressed message, but no compression was agreed', Code.Internal);
      yield data.subarray(pos + PREFIX, pos + PREFIX + length);
      pos += PREFIX + length;
    }
    pendingBytes = data.length - pos;
    if (pendingBytes > 0) pending.push(data.subarray(pos));
  }
  if (!foundStatus) validateTrailer(res.trailer, res.header);
  if (pendingBytes > 0) throw new ConnectError('protocol error: the stream ended inside a message', Code.Internal);
}
