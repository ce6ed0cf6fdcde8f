/**
 * CSI SnapshotMetadata: allocated blocks of a snapshot and changed blocks between two, streamed from
 * the engine's extent iterators. The generator yields one response per engine batch, so the stream
 * moves at the client's pace (connect pulls the next message only after the previous one is written),
 * and a cancelled call stops the iteration at once.
 */
import type { HandlerContext, ServiceImpl } from '@connectrpc/connect';
import { Code, ConnectError } from '@connectrpc/connect';
import {
  NotFoundError,
  type Extent,
  type ExtentStream,
  type ExtentStyle,
  type SnapshotInfo,
} from '../../storage-engine/index.js';
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
import {
  missingBaseMessage,
  profileBatchSize,
  profileOf,
  profileStyle,
  sendsEmptyMessage,
  shapeExtents,
  type MetadataProfile,
} from './metadata-profiles.js';

/** The most tuples we put in one message, whatever the client asks: bounds a message to a few hundred KiB. */
export const MAX_TUPLES_PER_MESSAGE = 16384;

type MetadataResponse = GetMetadataAllocatedResponse | GetMetadataDeltaResponse;

export function snapshotMetadataService(ctx: DriverContext): ServiceImpl<typeof SnapshotMetadata> {
  const { store } = ctx;

  /** max_results: 0 means "plugin decides" (the profile's default); negative is invalid. */
  const checkMaxResults = (maxResults: number): void => {
    if (maxResults < 0) throw rpcError(Code.InvalidArgument, `max_results must not be negative, got ${maxResults}`);
  };
  const batchSize = (profile: MetadataProfile, maxResults: number): number =>
    profileBatchSize(profile, maxResults, ctx.config.defaultMaxResults, MAX_TUPLES_PER_MESSAGE);
  const profileFor = (snapshot: SnapshotInfo): MetadataProfile =>
    profileOf(snapshot.attributes, ctx.config.defaultMetadataProfile ?? 'exact');

  /** Snapshots answer in the style of the volume they were taken of, stored with them at creation. */
  const styleOf = (snapshot: SnapshotInfo): ExtentStyle =>
    storedMetadataStyle(snapshot.attributes, ctx.config.defaultMetadataStyle);

  return {
    async *getMetadataAllocated(req, handler) {
      if (!req.snapshotId) throw rpcError(Code.InvalidArgument, 'snapshot_id is required');
      checkMaxResults(req.maxResults);
      const snapshot = store.getSnapshot(req.snapshotId);
      const profile = profileFor(snapshot);
      const size = batchSize(profile, req.maxResults);
      const startingOffset = checkedOffset(req.startingOffset, snapshot.capacityBytes);
      const style = profileStyle(profile, styleOf(snapshot));
      const stream = store.allocated(snapshot.id, {
        startingOffset,
        style: engineStyle(profile, style),
        batchSize: size,
      });
      yield* respond<GetMetadataAllocatedResponse>(
        'csi.v1.GetMetadataAllocatedResponse',
        profile,
        style,
        stream,
        size,
        handler,
      );
    },

    async *getMetadataDelta(req, handler) {
      if (!req.baseSnapshotId) throw rpcError(Code.InvalidArgument, 'base_snapshot_id is required');
      if (!req.targetSnapshotId) throw rpcError(Code.InvalidArgument, 'target_snapshot_id is required');
      checkMaxResults(req.maxResults);
      const target = store.getSnapshot(req.targetSnapshotId);
      const profile = profileFor(target);
      checkBase(store.getSnapshot.bind(store), req.baseSnapshotId, profile);
      const size = batchSize(profile, req.maxResults);
      const startingOffset = checkedOffset(req.startingOffset, target.capacityBytes);
      const style = profileStyle(profile, styleOf(target));
      const stream = store.delta(req.baseSnapshotId, target.id, {
        startingOffset,
        style: engineStyle(profile, style),
        batchSize: size,
      });
      yield* respond<GetMetadataDeltaResponse>(
        'csi.v1.GetMetadataDeltaResponse',
        profile,
        style,
        stream,
        size,
        handler,
      );
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

/** Profiles other than exact reshape merged runs themselves. */
function engineStyle(profile: MetadataProfile, style: ExtentStyle): ExtentStyle {
  return profile.name === 'exact' ? style : 'VARIABLE';
}

/**
 * Profiles that mimic another driver need the base to exist and answer its absence with that driver's
 * message. `exact` lets the engine answer: a deleted base answers from its change record (invariant 8),
 * or FAILED_PRECONDITION once that expired; an unknown one is NOT_FOUND.
 */
function checkBase(getSnapshot: (id: string) => SnapshotInfo, baseSnapshotId: string, profile: MetadataProfile): void {
  try {
    getSnapshot(baseSnapshotId);
  } catch (err) {
    if (!(err instanceof NotFoundError)) throw err;
    const message = missingBaseMessage(profile, baseSnapshotId, err.message);
    if (message !== undefined) throw rpcError(Code.NotFound, message);
  }
}

async function* respond<T extends MetadataResponse>(
  typeName: T['$typeName'],
  profile: MetadataProfile,
  style: ExtentStyle,
  stream: ExtentStream,
  batchSize: number,
  handler: HandlerContext,
): AsyncGenerator<T> {
  const blockMetadataType = style === 'FIXED' ? BlockMetadataType.FIXED_LENGTH : BlockMetadataType.VARIABLE_LENGTH;
  const volumeCapacityBytes = BigInt(stream.capacityBytes);
  let sent = !sendsEmptyMessage(profile);
  for await (const batch of shapeExtents(profile, stream, { batchSize, capacityBytes: stream.capacityBytes })) {
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
  return reason instanceof ConnectError
    ? reason
    : rpcError(Code.Unavailable, 'the call was aborted before all metadata was sent');
}
