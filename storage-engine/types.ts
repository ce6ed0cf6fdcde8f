/** Public data shapes of the block store. Byte offsets and sizes are plain numbers: the engine caps
 * addressable space at 2^32 blocks of at most 1 MiB (2^52 bytes), well inside Number's exact range. */

/** How extents are reported: one tuple a block, or merged runs of adjacent blocks. */
export type ExtentStyle = 'FIXED' | 'VARIABLE';

/** A contiguous byte range of a volume or snapshot. */
export interface Extent {
  /** Zero-based byte offset, always a multiple of the block size. */
  offset: number;
  /** Length in bytes, a positive multiple of the block size. */
  length: number;
}

/** Options of `allocated()` and `delta()`. */
export interface ExtentQueryOptions {
  /** Byte offset to start from; the first extent returned ends after it. Default 0. */
  startingOffset?: number;
  /** FIXED (one extent a block) or VARIABLE (merged runs). Default VARIABLE. */
  style?: ExtentStyle;
  /** Most extents in one yielded batch. Default 4096. */
  batchSize?: number;
}

/** String labels stored with a volume or snapshot (e.g. the parameters it was created with). */
export type Attributes = Readonly<Record<string, string>>;

/** What the store knows of a volume. */
export interface VolumeInfo {
  id: string;
  /** Caller-chosen unique name (used for idempotent creation), or undefined. */
  name: string | undefined;
  capacityBytes: number;
  blockSize: number;
  /** Where its content came from, if it was not created empty. */
  source: { kind: 'snapshot'; snapshotId: string } | { kind: 'volume'; volumeId: string } | undefined;
  attributes: Attributes;
  /** Milliseconds since the epoch. */
  createdAtMs: number;
}

/** What the store knows of a snapshot. */
export interface SnapshotInfo {
  id: string;
  name: string | undefined;
  /** The group snapshot it was taken in, if any (it is then deleted with its group, not alone). */
  groupId: string | undefined;
  /** The volume it was taken of (which may since have been deleted). */
  sourceVolumeId: string;
  /** The volume's capacity when the snapshot was taken. */
  capacityBytes: number;
  blockSize: number;
  attributes: Attributes;
  createdAtMs: number;
}

/** Arguments of `createVolume()`. */
export interface CreateVolumeRequest {
  /** Optional unique name; creating an existing name with identical arguments returns the existing volume. */
  name?: string;
  /** Virtual capacity; a positive multiple of the block size. */
  capacityBytes: number;
  /** Power of two from 4 KiB to 1 MiB; default from the store options (4 KiB). */
  blockSize?: number;
  /** Start from a snapshot's content (shares its layers). Capacity must be at least the snapshot's. */
  sourceSnapshotId?: string;
  /** Start from another volume's current content (freezes it into a shared hidden layer). */
  sourceVolumeId?: string;
  attributes?: Attributes;
}

/** What the store knows of a group snapshot: member snapshots taken at one point in time. */
export interface GroupSnapshotInfo {
  id: string;
  name: string | undefined;
  /** In the order of the request that created the group. */
  snapshots: SnapshotInfo[];
  createdAtMs: number;
}

/** Arguments of `createGroupSnapshot()`. */
export interface CreateGroupSnapshotRequest {
  name?: string;
  /** One entry a volume (no volume twice), with the attributes of its member snapshot. */
  members: ReadonlyArray<{ volumeId: string; attributes?: Attributes }>;
}

/** Arguments of `createSnapshot()`. */
export interface CreateSnapshotRequest {
  volumeId: string;
  name?: string;
  attributes?: Attributes;
}

/** Where the store's disk space goes. */
export interface SpaceUsage {
  /** Bytes allocated on disk by layer data files (sparse: only blocks actually stored). */
  layerBytes: number;
  /** Bytes of the catalog database and its write-ahead log. */
  catalogBytes: number;
  /** Sum of the virtual capacities of all volumes. */
  provisionedBytes: number;
  /** The store's limit on provisioned bytes, or undefined for none. */
  capacityLimitBytes: number | undefined;
  volumes: number;
  snapshots: number;
  /** Layers held, including hidden ones awaiting compaction. */
  layers: number;
  hiddenLayers: number;
}

/** Options of `BlockStore.open()`. */
export interface StoreOptions {
  /** Block size for volumes that do not name one. Default 4096. */
  defaultBlockSize?: number;
  /** Refuse volume creation or growth past this many provisioned bytes. Default: no limit. */
  capacityLimitBytes?: number;
  /** Merge hidden layers in the background after deletes. Default true; tests may call compact() instead. */
  autoCompact?: boolean;
  /**
   * How long a deleted snapshot stays usable as the base of a delta (its change record, bits only).
   * Defaults: 30 days, 256 per source volume.
   */
  deletedSnapshotRetention?: { maxAgeMs?: number; maxPerVolume?: number };
  /**
   * Bytes kept in reserve (a preallocated file in the store) so that deletes can commit on a full disk;
   * given back when a delete needs it and taken again when space is back. Default 4 MiB; 0 turns it off.
   */
  spaceReserveBytes?: number;
  /** Delays between retries of a failed background compaction: doubling from `firstMs` up to `maxMs`. */
  compactionRetry?: { firstMs?: number; maxMs?: number };
  /** Told of things an operator should see (failed compaction, the reserve given back). Must not throw. */
  onEvent?: (event: StoreEvent) => void;
}

/** Something the store tells its host about, for logs and metrics (the engine itself logs nothing). */
export type StoreEvent =
  | {
      type: 'compaction-failed';
      error: Error;
      /** The disk under the store is full. */
      noSpace: boolean;
      /** Failures in a row, this one included. */
      failures: number;
      /** When the next attempt runs, or undefined if none is scheduled (background compaction is off). */
      retryInMs: number | undefined;
    }
  | { type: 'compaction-recovered'; failures: number }
  | { type: 'space-reserve-released'; bytes: number; for: string }
  | { type: 'space-reserve-restored'; bytes: number }
  /** `updateVolumeAttributes` committed new attributes: hosts that act on them read them again. */
  | { type: 'volume-attributes-changed'; volumeId: string };

/** What one `compact()` pass did. */
export interface CompactionReport {
  /** Hidden layers merged into the layer above them. */
  merged: number;
  /** Layers dropped because nothing referenced them any more. */
  dropped: number;
  /** Blocks copied upward by merges. */
  blocksCopied: number;
}
