/**
 * CSI SnapshotMetadata: allocated blocks of a snapshot and changed blocks between two, streamed from
 * the engine's extent iterators. The generator yields one response per engine batch, so the stream
 * moves at the client's pace (connect pulls the next message only after the previous one is written),
 * and a cancelled call stops the iteration at once.
 */
import type { HandlerContext, ServiceImpl } from '@connectrpc/connect';
import { Code, ConnectError } from '@connectrpc/connect';
import type { Extent, ExtentStream, ExtentStyle, SnapshotInfo } from '../../storage-engine/index.js';
import {
  BlockMetadataType,
  type GetMetadataAllocatedResponse,
  type GetMetadataDeltaResponse,
  type SnapshotMetadata,
} from '../gen/csi/v1/csi_pb.js';
import { rpcError } from '../rpc/status.js';
import { encodeBlockMetadataField, noteTuples } from './block-metadata-wire.js';
import type { DriverContext } from './driver-context.js';
import { storedMetadataStyle } from './volume-parameters.js';

/** The most tuples we put in one message, whatever the client asks: bounds a message to a few hundred KiB. */
export const MAX_TUPLES_PER_MESSAGE = 16384;

type MetadataResponse = GetMetadataAllocatedResponse | GetMetadataDeltaResponse;

export function snapshotMetadataService(ctx: DriverContext): ServiceImpl<typeof SnapshotMetadata> {
  const { store } = ctx;

  /** max_results: 0 means "plugin decides"; negative is invalid. */
  const batchSize = (maxResults: number): number => {
    if (maxResults < 0) throw rpcError(Code.InvalidArgument, `max_results must not be negative, got ${maxResults}`);
    return Math.min(maxResults === 0 ? ctx.config.defaultMaxResults : maxResults, MAX_TUPLES_PER_MESSAGE);
  };

  /** Snapshots answer in the style of the volume they were taken of, stored with them at creation. */
  const styleOf = (snapshot: SnapshotInfo): ExtentStyle => storedMetadataStyle(snapshot.attributes, ctx.config.defaultMetadataStyle);

  return {
    async *getMetadataAllocated(req, handler) {
      if (!req.snapshotId) throw rpcError(Code.InvalidArgument, 'snapshot_id is required');
      const size = batchSize(req.maxResults);
      const snapshot = store.getSnapshot(req.snapshotId);
      const startingOffset = checkedOffset(req.startingOffset, snapshot.capacityBytes);
      const stream = store.allocated(snapshot.id, { startingOffset, style: styleOf(snapshot), batchSize: size });
      yield* respond<GetMetadataAllocatedResponse>('csi.v1.GetMetadataAllocatedResponse', stream, handler);
    },

    async *getMetadataDelta(req, handler) {
      if (!req.baseSnapshotId) throw rpcError(Code.InvalidArgument, 'base_snapshot_id is required');
      if (!req.targetSnapshotId) throw rpcError(Code.InvalidArgument, 'target_snapshot_id is required');
      const size = batchSize(req.maxResults);
      // The base may be a deleted snapshot: the engine answers from its change record (or FAILED_PRECONDITION).
      const target = store.getSnapshot(req.targetSnapshotId);
      const startingOffset = checkedOffset(req.startingOffset, target.capacityBytes);
      const stream = store.delta(req.baseSnapshotId, target.id, {
        startingOffset,
        style: styleOf(target),
        batchSize: size,
      });
      yield* respond<GetMetadataDeltaResponse>('csi.v1.GetMetadataDeltaResponse', stream, handler);
    },
  };
}

/** starting_offset outside [0, capacity] is OUT_OF_RANGE, per the spec's error tables. */
function checkedOffset(offset: bigint, capacityBytes: number): number {
  if (offset < 0n || offset > BigInt(capacityBytes)) {
    throw rpcError(
      Code.OutOfRange,
      `starting_offset ${offset} is outside the snapshot's ${capacityBytes} bytes (it must be from 0 to the capacity)`,
    );
  }
  return Number(offset);
}

async function* respond<T extends MetadataResponse>(
  typeName: T['$typeName'],
  stream: ExtentStream,
  handler: HandlerContext,
): AsyncGenerator<T> {
  const blockMetadataType = stream.style === 'FIXED' ? BlockMetadataType.FIXED_LENGTH : BlockMetadataType.VARIABLE_LENGTH;
  const volumeCapacityBytes = BigInt(stream.capacityBytes);
  let sent = false;
  for await (const batch of stream) {
    // A clean end of stream tells the client it has everything, so an aborted call (client gone,
    // deadline passed, server shutting down) must end in an error instead.
    if (handler.signal.aborted) throw abortError(handler.signal);
    yield response(typeName, blockMetadataType, volumeCapacityBytes, batch);
    sent = true;
  }
  // Nothing to report still tells the client the style and the capacity.
  if (!sent) yield response(typeName, blockMetadataType, volumeCapacityBytes, []);
}

/** A finished response message; its tuples are pre-encoded (block-metadata-wire.ts says why). */
function response<T extends MetadataResponse>(
  typeName: T['$typeName'],
  blockMetadataType: BlockMetadataType,
  volumeCapacityBytes: bigint,
  extents: readonly Extent[],
): T {
  const message: MetadataResponse = {
    $typeName: typeName,
    blockMetadataType,
    volumeCapacityBytes,
    blockMetadata: [],
    $unknown: encodeBlockMetadataField(extents),
  };
  noteTuples(message, extents.length);
  // Both response types have the same fields; the type name alone tells them apart.
  return message as T;
}

function abortError(signal: AbortSignal): ConnectError {
  const reason: unknown = signal.reason;
  return reason instanceof ConnectError ? reason : rpcError(Code.Unavailable, 'the call was aborted before all metadata was sent');
}

