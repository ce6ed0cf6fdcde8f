/** The block store: copy-on-write layers with per-layer bitmaps. Knows nothing of CSI, gRPC, FUSE or Kubernetes. */
export { BlockStore } from './block-store.js';
export type { ExtentStream } from './extent-stream.js';
export { DEFAULT_BATCH_SIZE } from './extent-stream.js';
export * from './errors.js';
export type * from './types.js';
export { isSnapshotId, isVolumeId } from './ids.js';
export { MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, MAX_BLOCKS, checkBlockSize } from './validate.js';
export { KeyedMutex } from './keyed-mutex.js';
export type { StoreCapacity } from './capacity.js';
