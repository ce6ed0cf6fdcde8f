/**
 * The block store: volumes as chains of copy-on-write layers, O(1) snapshots, clones that share layers,
 * and changed-block queries answered from per-layer bitmaps. A facade over parts with one job each:
 *   Layer        one layer's file and bits, and the durability protocol (invariants 3, 4)
 *   LayerFiles   layer files' lifecycle, orphans and modes (invariants 5, 7)
 *   Records      volumes and snapshots, names, holds, provisioning
 *   BlockIo      reads, writes and trims over a chain's location index (invariant 10)
 *   chain.ts     allocated / changed blocks of a chain, and building its index (invariant 1)
 *   Compactor    merging hidden layers away (invariant 2)
 *   Catalog      the transactions that change the store's shape
 * This file holds the structural transactions (create, clone, snapshot, delete), recovery, and locking.
 *
 * Concurrency model (single Node thread):
 * - data operations (write, read, trim) are synchronous and never interleave with each other;
 * - structural operations on one volume (flush, snapshot, clone-from, grow, delete) queue on a per-volume mutex;
 * - every change to one layer's persisted bits queues on that layer's commit queue, and the last decision
 *   before a commit is always taken after the last await.
 */
import fs from 'node:fs';
import path from 'node:path';
import { BlockIo, trimmedBlocks } from './block-io.js';
import { type DirectIoHost, DirectIoSession } from './direct-io.js';
import {
  checkAddressable,
  probeFileSystem,
  storeCapacity,
  type FileSystemLimits,
  type StoreCapacity,
} from './capacity.js';
import { Catalog, type TombstoneRow } from './catalog.js';
import { allocatedBlocks, chainOf, changedBlocks, indexChain } from './chain.js';
import { type CompactionHost, Compactor } from './compaction.js';
import {
  BusyError,
  HistoryGoneError,
  InvalidArgumentError,
  NoSpaceError,
  NotFoundError,
  StoreClosedError,
  UnrelatedSnapshotsError,
} from './errors.js';
import { Bitmap, clipBelow, decodeBitmap, unionOf } from './bitmap.js';
import { DEFAULT_TOMBSTONE_RETENTION, type Tombstone, Tombstones } from './tombstones.js';
import { DEFAULT_BATCH_SIZE, type ExtentStream, extentStream } from './extent-stream.js';
import { newGroupId, newSnapshotId, newVolumeId } from './ids.js';
import { type EmitEvent, eventSink } from './events.js';
import { KeyedMutex } from './keyed-mutex.js';
import { Layer } from './layer.js';
import { FILE_MODE, LayerFiles, makePrivateDir } from './layer-files.js';
import { takeOwnership } from './owner-lock.js';
import {
  type GroupRecord,
  Records,
  type SnapshotRecord,
  type VolumeRecord,
  type VolumeWish,
  snapshotFromRow,
  snapshotInfo,
  snapshotRow,
  volumeFromRow,
  volumeInfo,
  volumeRow,
} from './records.js';
import { SpaceReserve } from './space-reserve.js';
import type {
  Attributes,
  CompactionReport,
  CreateGroupSnapshotRequest,
  GroupSnapshotInfo,
  CreateSnapshotRequest,
  CreateVolumeRequest,
  ExtentQueryOptions,
  SnapshotInfo,
  SpaceUsage,
  StoreOptions,
  VolumeInfo,
} from './types.js';
import {
  checkAttributes,
  checkBatchSize,
  checkBlockSize,
  checkCapacity,
  checkName,
  checkRange,
  checkStartingOffset,
} from './validate.js';

const CATALOG_FILE = 'catalog.db';
/** Snapshots whose read index is kept after a read (reads of snapshots are rare: restores read clones). */
const SNAPSHOT_IO_CACHE = 8;

/** A copy-on-write block store rooted at one directory. */
export class BlockStore {
  private readonly catalog: Catalog;
  private readonly files: LayerFiles;
  private readonly records: Records;
  /** Change records of deleted snapshots, so deltas from them stay exact (invariant 8). */
  private readonly tombstones: Tombstones;
  private readonly layers = new Map<number, Layer>();
  /** Each volume's reads and writes, through its chain's location index. */
  private readonly volumeIo = new Map<string, BlockIo>();
  /** Recently read snapshots' indexes, most recent last. */
  private readonly snapshotIo = new Map<string, BlockIo>();
  private readonly volumeLocks = new KeyedMutex();
  /** Open direct I/O sessions by volume (see direct-io.ts), and merges into a head that keep them off. */
  private readonly directIo = new Map<string, DirectIoSession>();
  private readonly directIoBlocked = new Map<string, number>();
  private readonly compactor: Compactor;
  private readonly space: SpaceReserve;
  private readonly emit: EmitEvent;
  private readonly defaultBlockSize: number;
  private readonly capacityLimitBytes: number | undefined;
  private readonly autoCompact: boolean;
  private closed = false;
  private readonly releaseOwnership: () => void;
  private closing: Promise<void> | undefined;
  /** The largest file the state filesystem holds, probed once at open: it bounds every volume's size. */
  private readonly fileSystem: FileSystemLimits;

  private constructor(
    readonly dir: string,
    options: StoreOptions,
  ) {
    this.defaultBlockSize = checkBlockSize(options.defaultBlockSize ?? 4096);
    if (options.capacityLimitBytes !== undefined) {
      if (!Number.isSafeInteger(options.capacityLimitBytes) || options.capacityLimitBytes <= 0) {
        throw new InvalidArgumentError('capacityLimitBytes must be a positive integer');
      }
    }
    this.capacityLimitBytes = options.capacityLimitBytes;
    this.autoCompact = options.autoCompact ?? true;
    this.emit = eventSink(options.onEvent);
    this.records = new Records(this.capacityLimitBytes);
    this.tombstones = new Tombstones({
      maxAgeMs: options.deletedSnapshotRetention?.maxAgeMs ?? DEFAULT_TOMBSTONE_RETENTION.maxAgeMs,
      maxPerVolume: options.deletedSnapshotRetention?.maxPerVolume ?? DEFAULT_TOMBSTONE_RETENTION.maxPerVolume,
    });
    makePrivateDir(dir);
    this.releaseOwnership = takeOwnership(dir);
    try {
      this.files = new LayerFiles(dir, () => this.catalog.nextLayerId());
      this.fileSystem = probeFileSystem(dir);
      this.space = new SpaceReserve(dir, options);
      this.catalog = openCatalog(path.join(dir, CATALOG_FILE));
    } catch (err) {
      this.releaseOwnership();
      throw err;
    }
    try {
      this.load();
    } catch (err) {
      this.catalog.close();
      this.releaseOwnership();
      throw err;
    }
    this.compactor = new Compactor(this.compactionHost(), {
      retry: this.autoCompact ? (options.compactionRetry ?? {}) : undefined,
      onEvent: options.onEvent,
      space: this.space,
    });
    if (this.autoCompact) this.compactor.schedule();
  }

  /** Opens a store directory, creating it if new and recovering it if it exists. */
  static open(dir: string, options: StoreOptions = {}): BlockStore {
    return new BlockStore(path.resolve(dir), options);
  }

  // ---------------------------------------------------------------- recovery

  private load(): void {
    for (const stored of this.catalog.loadLayers()) {
      const file = this.files.pathOf(stored.id);
      if (!this.files.exists(stored.id)) {
        throw new Error(`catalog references layer ${stored.id} but ${file} is missing: the store is damaged`);
      }
      const { id, parentId, blockSize, written, trimmed, frozen } = stored;
      this.layers.set(id, new Layer(id, parentId, blockSize, file, written, trimmed, frozen));
    }
    for (const row of this.catalog.allVolumes()) this.records.addVolume(volumeFromRow(row));
    for (const row of this.catalog.allSnapshots()) this.records.addSnapshot(snapshotFromRow(row));
    for (const row of this.catalog.allGroups()) {
      this.records.addGroup({
        id: row.id,
        name: row.name ?? undefined,
        snapshotIds: row.snapshot_ids,
        createdAtMs: row.created_at_ms,
      });
    }
    for (const row of this.catalog.allTombstones()) {
      this.tombstones.add({
        snapshotId: row.snapshot_id,
        sourceVolumeId: row.source_volume_id,
        anchorLayerId: row.anchor_layer_id,
        changed: row.expired === 1 ? null : decodeBitmap(row.changed),
        excluded: row.expired === 1 || row.counts_anchor !== 1 ? null : decodeBitmap(row.excluded),
        capacityBytes: row.capacity_bytes,
        blockSize: row.block_size,
        deletedAtMs: row.deleted_at_ms,
      });
    }
    for (const layer of this.layers.values()) if (!layer.frozen) this.watchIfAnchor(layer);
    for (const vol of this.records.volumes.values()) {
      const head = this.layer(vol.headId);
      this.volumeIo.set(vol.id, new BlockIo(head, indexChain(chainOf(head.id, this.layers)), vol.blockSize));
    }
    this.files.removeOrphans((id) => this.layers.has(id));
    this.files.prepareSpare();
  }

  // ---------------------------------------------------------------- volumes

  /** Creates an empty volume, or one that starts from a snapshot's or a volume's content. Idempotent by name. */
  async createVolume(req: CreateVolumeRequest): Promise<VolumeInfo> {
    this.checkOpen();
    if (req === null || typeof req !== 'object') throw new InvalidArgumentError('a volume request is required');
    const name = checkName(req.name, 'volume');
    const attributes = checkAttributes(req.attributes);
    if (req.sourceSnapshotId !== undefined && req.sourceVolumeId !== undefined) {
      throw new InvalidArgumentError('a volume can start from a snapshot or from a volume, not both');
    }
    let blockSize = req.blockSize === undefined ? undefined : checkBlockSize(req.blockSize);
    let sourceSnapshot: SnapshotRecord | undefined;
    let source: VolumeInfo['source'];
    let minimumCapacity = 0;
    if (req.sourceSnapshotId !== undefined) {
      sourceSnapshot = this.records.snapshot(req.sourceSnapshotId);
      blockSize = sourceBlockSize(blockSize, sourceSnapshot.blockSize, `snapshot ${sourceSnapshot.id}`);
      minimumCapacity = sourceSnapshot.capacityBytes;
      source = { kind: 'snapshot', snapshotId: sourceSnapshot.id };
    } else if (req.sourceVolumeId !== undefined) {
      const src = this.records.volume(req.sourceVolumeId);
      blockSize = sourceBlockSize(blockSize, src.blockSize, `volume ${src.id}`);
      minimumCapacity = src.capacityBytes;
      source = { kind: 'volume', volumeId: src.id };
    }
    blockSize ??= this.defaultBlockSize;
    const capacityBytes = checkCapacity(req.capacityBytes, blockSize);
    checkAddressable(this.fileSystem, capacityBytes, blockSize);
    if (capacityBytes < minimumCapacity) {
      throw new InvalidArgumentError(`capacity ${capacityBytes} is smaller than the source's ${minimumCapacity} bytes`);
    }
    const wanted: VolumeWish = { name, capacityBytes, blockSize, source, attributes };
    const existing = this.records.sameNameVolume(wanted);
    if (existing) return volumeInfo(existing);
    this.records.checkProvisioning(capacityBytes, 0);
    this.space.checkRoomToCreate('creating a volume');

    if (source?.kind === 'volume') {
      const srcId = source.volumeId;
      return this.volumeLocks.run(srcId, async () => {
        const src = this.records.volume(srcId);
        const head = this.layer(src.headId);
        return head.exclusive(async () => {
          const syncRest = await head.prepareFreeze();
          // Decisions from here on are taken after the last await.
          this.checkOpen();
          const again = this.records.sameNameVolume(wanted);
          if (again) return volumeInfo(again);
          this.records.checkProvisioning(capacityBytes, 0);
          if (!this.records.volumes.has(srcId)) throw new NotFoundError(`volume ${srcId} was deleted`);
          this.revokeDirectIo(srcId);
          syncRest();
          return this.cloneFromVolumeNow(src, head, wanted);
        });
      });
    }
    return this.insertVolume(wanted, sourceSnapshot);
  }

  private newVolumeRecord(wanted: VolumeWish): VolumeRecord {
    return { id: newVolumeId(), ...wanted, headId: -1, createdAtMs: Date.now() };
  }

  /** An empty volume, or one whose head sits on a snapshot's layer. */
  private insertVolume(wanted: VolumeWish, from: SnapshotRecord | undefined): VolumeInfo {
    const record = this.newVolumeRecord(wanted);
    const parentId = from?.layerId ?? null;
    const head = this.files.withNewLayers(this.insertLayerRow, (newLayer) =>
      this.catalog.transaction(() => {
        const layer = newLayer(parentId, record.blockSize);
        record.headId = layer.id;
        this.catalog.insertVolume(volumeRow(record));
        return layer;
      }),
    );
    this.layers.set(head.id, head);
    // A restore reads what the snapshot reads: start from the snapshot's index if one is at hand.
    const below = from && this.snapshotIo.get(from.id);
    const io = below
      ? below.cloneOnto(head)
      : new BlockIo(head, indexChain(chainOf(parentId, this.layers)), record.blockSize);
    this.volumeIo.set(record.id, io);
    this.records.addVolume(record);
    return volumeInfo(record);
  }

  /** Freezes the source's head into a shared hidden layer; source and clone each get a new head on it. */
  private cloneFromVolumeNow(src: VolumeRecord, head: Layer, wanted: VolumeWish): VolumeInfo {
    const record = this.newVolumeRecord(wanted);
    const [srcHead, cloneHead] = this.files.withNewLayers(this.insertLayerRow, (newLayer) =>
      this.catalog.transaction(() => {
        this.catalog.freezeLayer(head.id, head.written, head.trimmed);
        this.persistAnchoredAt(head.id);
        const a = newLayer(head.id, src.blockSize);
        const b = newLayer(head.id, src.blockSize);
        this.catalog.setVolumeHead(src.id, a.id);
        record.headId = b.id;
        this.catalog.insertVolume(volumeRow(record));
        return [a, b] as const;
      }),
    );
    head.freeze();
    this.layers.set(srcHead.id, srcHead);
    this.layers.set(cloneHead.id, cloneHead);
    src.headId = srcHead.id;
    const srcIo = this.io(src.id);
    srcIo.replaceHead(srcHead);
    this.volumeIo.set(record.id, srcIo.cloneOnto(cloneHead));
    this.records.addVolume(record);
    return volumeInfo(record);
  }

  getVolume(id: string): VolumeInfo {
    this.checkOpen();
    return volumeInfo(this.records.volume(id));
  }

  findVolumeByName(name: string): VolumeInfo | undefined {
    this.checkOpen();
    const record = this.records.volumeNamed(name);
    return record && volumeInfo(record);
  }

  /** Volumes in creation order. */
  listVolumes(): VolumeInfo[] {
    this.checkOpen();
    return [...this.records.volumes.values()].map(volumeInfo);
  }

  /** Deletes a volume; its snapshots stay, and their layers stay until nothing needs them. */
  async deleteVolume(id: string): Promise<void> {
    this.checkOpen();
    this.records.volume(id);
    this.records.checkNotHeld(id);
    await this.volumeLocks.run(id, async () => {
      const vol = this.records.volume(id);
      const head = this.layer(vol.headId);
      await head.exclusive(() => {
        this.checkOpen();
        this.records.checkNotHeld(id);
        this.revokeDirectIo(id);
        const applied = this.space.freeing(`deleting volume ${id}`, () =>
          this.catalog.transaction(() => {
            this.catalog.deleteVolume(id);
            this.catalog.deleteLayer(head.id);
            // A head has nothing above it: change records anchored at it can never answer again.
            return this.changeRecordsLeave(head, undefined);
          }),
        );
        applied();
        this.records.removeVolume(id);
        this.volumeIo.delete(id);
        this.forgetLayer(head);
      });
    });
    await this.files.settle();
    this.afterDelete();
  }

  /** Grows a volume's virtual capacity (never shrinks: data past a smaller end would be lost). */
  async growVolume(id: string, capacityBytes: number): Promise<VolumeInfo> {
    this.checkOpen();
    const vol = this.records.volume(id);
    checkCapacity(capacityBytes, vol.blockSize);
    checkAddressable(this.fileSystem, capacityBytes, vol.blockSize);
    return this.volumeLocks.run(id, () => {
      this.checkOpen();
      const current = this.records.volume(id);
      if (capacityBytes < current.capacityBytes) {
        throw new InvalidArgumentError(
          `volume ${id} has ${current.capacityBytes} bytes; shrinking to ${capacityBytes} is not supported`,
        );
      }
      if (capacityBytes === current.capacityBytes) return volumeInfo(current);
      this.records.checkProvisioning(capacityBytes, current.capacityBytes);
      this.catalog.setVolumeCapacity(id, capacityBytes);
      current.capacityBytes = capacityBytes;
      return volumeInfo(current);
    });
  }

  /**
   * Sets some of a volume's attributes (others keep their values) in one catalog transaction, then emits
   * `volume-attributes-changed`. Setting the values it already has changes nothing and emits nothing.
   */
  async updateVolumeAttributes(id: string, changes: Attributes): Promise<VolumeInfo> {
    this.checkOpen();
    const set = checkAttributes(changes);
    this.records.volume(id);
    const updated = await this.volumeLocks.run(id, () => {
      this.checkOpen();
      const current = this.records.volume(id);
      if (Object.entries(set).every(([k, v]) => current.attributes[k] === v)) return undefined;
      const attributes = { ...current.attributes, ...set };
      this.catalog.setVolumeAttributes(id, JSON.stringify(attributes));
      current.attributes = attributes;
      return volumeInfo(current);
    });
    if (!updated) return this.getVolume(id);
    this.emit({ type: 'volume-attributes-changed', volumeId: id });
    return updated;
  }

  /** Marks a volume in use by `holder`; it cannot be deleted until every holder releases it. */
  hold(volumeId: string, holder: string): void {
    this.checkOpen();
    this.records.hold(volumeId, holder);
  }

  release(volumeId: string, holder: string): void {
    this.records.release(volumeId, holder);
  }

  // ---------------------------------------------------------------- data

  /** Writes bytes at any offset; partial blocks the head does not hold are filled from the layers below. */
  write(volumeId: string, offset: number, data: Uint8Array): void {
    this.checkOpen();
    const vol = this.records.volume(volumeId);
    if (!(data instanceof Uint8Array)) throw new InvalidArgumentError('write data must be bytes');
    checkRange(offset, data.length, vol.capacityBytes, 'write');
    if (data.length === 0) return;
    const io = this.io(volumeId);
    const direct = this.directIo.get(volumeId);
    const write = (): void => {
      this.changeRecordsBeforeRewrite(io.head, offset, data.length);
      io.write(offset, data);
    };
    const B = io.blockSize;
    if (direct) direct.host.exclusive(write, [[Math.floor(offset / B), Math.ceil((offset + data.length) / B), true]]);
    else write();
  }

  /** Reads bytes at any offset; never-written and trimmed ranges read as zeros. */
  read(volumeId: string, offset: number, length: number): Buffer {
    this.checkOpen();
    const vol = this.records.volume(volumeId);
    checkRange(offset, length, vol.capacityBytes, 'read');
    this.drainDirectIo(volumeId);
    return this.io(volumeId).read(offset, length);
  }

  /** Reads into a caller's buffer (the data plane's path: no allocation per request). */
  readInto(
    volumeId: string,
    offset: number,
    target: Uint8Array,
    targetOffset = 0,
    length = target.length - targetOffset,
  ): void {
    this.checkOpen();
    const vol = this.records.volume(volumeId);
    checkRange(offset, length, vol.capacityBytes, 'read');
    if (targetOffset < 0 || targetOffset + length > target.length) {
      throw new InvalidArgumentError('read target is smaller than the requested length');
    }
    this.drainDirectIo(volumeId);
    this.io(volumeId).readInto(offset, target, targetOffset, length);
  }

  /** Trims a range: whole blocks become zeros recorded as trims, partial edges are overwritten with zeros. */
  trim(volumeId: string, offset: number, length: number): void {
    this.checkOpen();
    const vol = this.records.volume(volumeId);
    checkRange(offset, length, vol.capacityBytes, 'trim');
    if (length === 0) return;
    const io = this.io(volumeId);
    const direct = this.directIo.get(volumeId);
    const trim = (): void => {
      // A trim's partial edge blocks are written with zeros, in place.
      this.changeRecordsBeforeRewrite(io.head, offset, length);
      io.trim(offset, length);
    };
    if (direct) direct.host.exclusive(trim, trimmedBlocks(offset, length, io.blockSize));
    else trim();
  }

  /**
   * A write to a block the head already holds lands in place, and its bytes can outlive a kill -9 that comes
   * before the next flush (the page cache keeps them). Where a change record excludes such a block (a merge
   * brought it in, unchanged since the deleted snapshot), the record must say the block changed before the
   * bytes do, or a delta from the deleted snapshot would miss it after the kill (invariant 8): so it is
   * stored here, ahead of the write. Rare: only the first rewrite of a block a merge into a live head brought in.
   */
  private changeRecordsBeforeRewrite(head: Layer, offset: number, length: number): void {
    const first = Math.floor(offset / head.blockSize);
    const end = Math.ceil((offset + length) / head.blockSize);
    const affected = this.tombstones.excludingAny(head.id, first, end);
    if (affected.length === 0) return;
    this.catalog.transaction(() => {
      for (const t of affected) {
        const excluded = t.excluded!.clone();
        excluded.removeRange(first, end);
        this.catalog.moveTombstone(t.snapshotId, t.anchorLayerId, t.changed, excluded);
      }
    });
    this.tombstones.touched(head.id, first, end);
  }

  /** Makes every completed write and trim of the volume durable (survives kill -9 and power loss). */
  async flush(volumeId: string): Promise<void> {
    this.checkOpen();
    this.records.volume(volumeId);
    await this.volumeLocks.run(volumeId, async () => {
      const head = this.layer(this.records.volume(volumeId).headId);
      await head.exclusive(() => {
        this.drainDirectIo(volumeId);
        return this.commitHead(head);
      });
    });
  }

  private commitHead(head: Layer): Promise<void> {
    const journal = {
      appendJournal: (layerId: number, setWritten: Bitmap, setTrimmed: Bitmap) =>
        this.catalog.transaction(() => {
          this.catalog.appendJournal(layerId, setWritten, setTrimmed);
          this.persistAnchoredAt(layerId);
        }),
    };
    return head.commit(journal, () => this.layers.get(head.id) === head);
  }

  // ---------------------------------------------------------------- direct I/O (see direct-io.ts)

  /**
   * Opens a direct I/O session on a volume for `host`, or returns undefined while the volume cannot have one
   * (a merge into its head is running). One session a volume at a time.
   */
  openDirectIo(volumeId: string, host: DirectIoHost): DirectIoSession | undefined {
    this.checkOpen();
    const vol = this.records.volume(volumeId);
    if (this.directIo.has(volumeId)) throw new BusyError(`volume ${volumeId} already has a direct I/O session`);
    if (this.directIoBlocked.has(volumeId)) return undefined;
    const io = this.io(volumeId);
    const session = new DirectIoSession(
      volumeId,
      io,
      () => vol.capacityBytes,
      () => unionOf(this.tombstones.anchoredAt(io.head.id).flatMap((t) => (t.excluded ? [t.excluded] : []))),
      host,
      (ended) => {
        if (this.directIo.get(volumeId) === ended) this.directIo.delete(volumeId);
      },
    );
    this.directIo.set(volumeId, session);
    return session;
  }

  /** Records the volume's completed direct writes before the engine reads or changes its blocks. */
  private drainDirectIo(volumeId: string): void {
    this.directIo.get(volumeId)?.host.drain();
  }

  /** Ends the volume's direct I/O session before its head or chain changes. */
  private revokeDirectIo(volumeId: string): void {
    this.directIo.get(volumeId)?.revoke();
  }

  // ---------------------------------------------------------------- snapshots

  /** Flushes the volume and freezes its head as the snapshot's layer: constant time whatever the size or chain. */
  async createSnapshot(req: CreateSnapshotRequest): Promise<SnapshotInfo> {
    this.checkOpen();
    if (req === null || typeof req !== 'object') throw new InvalidArgumentError('a snapshot request is required');
    const name = checkName(req.name, 'snapshot');
    const attributes = checkAttributes(req.attributes);
    // By name first: a retry must get its snapshot even if the source volume was deleted after the cut.
    const existing = this.records.sameNameSnapshot(name, req.volumeId);
    if (existing) return snapshotInfo(existing);
    this.records.volume(req.volumeId);
    this.space.checkRoomToCreate('creating a snapshot');
    return this.withHeadsFrozen([req.volumeId], () => {
      const again = this.records.sameNameSnapshot(name, req.volumeId);
      if (again) return snapshotInfo(again);
      const [record] = this.cut([{ volumeId: req.volumeId, name, attributes }], undefined);
      return snapshotInfo(record!);
    });
  }

  /**
   * Snapshots several volumes at one point in time (invariant 9): every head is synced, then all are frozen
   * in one catalog transaction with no await in between, so no write lands in some members and not others.
   * Idempotent by name (same volumes: the existing group; other volumes: ALREADY_EXISTS).
   */
  async createGroupSnapshot(req: CreateGroupSnapshotRequest): Promise<GroupSnapshotInfo> {
    this.checkOpen();
    if (req === null || typeof req !== 'object') throw new InvalidArgumentError('a group snapshot request is required');
    const name = checkName(req.name, 'group snapshot');
    if (!Array.isArray(req.members) || req.members.length === 0) {
      throw new InvalidArgumentError('a group snapshot needs at least one volume');
    }
    const members = req.members.map((m) => ({ volumeId: m.volumeId, attributes: checkAttributes(m.attributes) }));
    const volumeIds = members.map((m) => m.volumeId);
    if (new Set(volumeIds).size !== volumeIds.length)
      throw new InvalidArgumentError('a volume is named twice in the group');
    const existing = this.records.sameNameGroup(name, volumeIds);
    if (existing) return this.groupInfo(existing);
    for (const id of volumeIds) this.records.volume(id);
    this.space.checkRoomToCreate('creating a group snapshot');
    return this.withHeadsFrozen(volumeIds, () => {
      const again = this.records.sameNameGroup(name, volumeIds);
      if (again) return this.groupInfo(again);
      const group: GroupRecord = { id: newGroupId(), name, snapshotIds: [], createdAtMs: Date.now() };
      this.cut(
        members.map((m) => ({ ...m, name: undefined })),
        group,
      );
      return this.groupInfo(this.records.group(group.id));
    });
  }

  getGroupSnapshot(id: string): GroupSnapshotInfo {
    this.checkOpen();
    return this.groupInfo(this.records.group(id));
  }

  /** Group snapshots in creation order. */
  listGroupSnapshots(): GroupSnapshotInfo[] {
    this.checkOpen();
    return [...this.records.groups.values()].map((g) => this.groupInfo(g));
  }

  /** Deletes a group and its member snapshots in one transaction (each leaves its change record). */
  async deleteGroupSnapshot(id: string): Promise<void> {
    this.checkOpen();
    const group = this.records.group(id);
    const members = group.snapshotIds.map((s) => this.records.snapshot(s));
    this.retireSnapshots(members, () => this.catalog.deleteGroup(id), `deleting group snapshot ${id}`);
    this.records.removeGroup(id);
    this.afterDelete();
  }

  private groupInfo(group: GroupRecord): GroupSnapshotInfo {
    return {
      id: group.id,
      name: group.name,
      snapshots: group.snapshotIds.map((s) => snapshotInfo(this.records.snapshot(s))),
      createdAtMs: group.createdAtMs,
    };
  }

  /**
   * Runs `fn` with every named volume's structural work and head commits held, after each head's data was
   * made durable; `fn` runs synchronously after the last await, so it sees one point in time of all of them.
   */
  private withHeadsFrozen<T>(volumeIds: readonly string[], fn: () => T): Promise<T> {
    // A fixed order (sorted) so two groups over the same volumes cannot wait on each other.
    const sorted = [...volumeIds].sort();
    const lockVolumes = (i: number): Promise<T> =>
      i === sorted.length
        ? lockHeads(
            0,
            sorted.map((id) => this.layer(this.records.volume(id).headId)),
          )
        : this.volumeLocks.run(sorted[i]!, () => lockVolumes(i + 1));
    const lockHeads = (i: number, heads: Layer[]): Promise<T> =>
      i === heads.length
        ? (async () => {
            const syncRests = await Promise.all(heads.map((h) => h.prepareFreeze()));
            // Decisions from here on are taken after the last await.
            this.checkOpen();
            for (const id of sorted) this.revokeDirectIo(id);
            for (const rest of syncRests) rest();
            return fn();
          })()
        : heads[i]!.exclusive(() => lockHeads(i + 1, heads));
    return lockVolumes(0);
  }

  /**
   * Freezes each volume's head as a snapshot and starts a new head, in one transaction (with the group's row
   * if a group is given). Call only inside withHeadsFrozen. Returns the new snapshots in member order.
   */
  private cut(
    members: ReadonlyArray<{ volumeId: string; name: string | undefined; attributes: Attributes }>,
    group: GroupRecord | undefined,
  ): SnapshotRecord[] {
    const now = Date.now();
    const plan = members.map((m) => {
      const vol = this.records.volume(m.volumeId);
      const head = this.layer(vol.headId);
      const record: SnapshotRecord = {
        id: newSnapshotId(),
        name: m.name,
        sourceVolumeId: vol.id,
        layerId: head.id,
        capacityBytes: vol.capacityBytes,
        blockSize: vol.blockSize,
        attributes: m.attributes,
        createdAtMs: now,
      };
      return { vol, head, record };
    });
    if (group) group.snapshotIds = plan.map((p) => p.record.id);
    const newHeads = this.files.withNewLayers(this.insertLayerRow, (newLayer) =>
      this.catalog.transaction(() => {
        const heads = plan.map(({ vol, head, record }) => {
          this.catalog.freezeLayer(head.id, head.written, head.trimmed);
          this.persistAnchoredAt(head.id);
          const layer = newLayer(head.id, vol.blockSize);
          this.catalog.setVolumeHead(vol.id, layer.id);
          this.catalog.insertSnapshot(snapshotRow(record));
          return layer;
        });
        if (group) {
          this.catalog.insertGroup({
            id: group.id,
            name: group.name ?? null,
            created_at_ms: group.createdAtMs,
            snapshot_ids: group.snapshotIds,
          });
        }
        return heads;
      }),
    );
    plan.forEach(({ vol, head, record }, i) => {
      const newHead = newHeads[i]!;
      head.freeze();
      this.layers.set(newHead.id, newHead);
      vol.headId = newHead.id;
      this.io(vol.id).replaceHead(newHead);
      this.records.addSnapshot(record);
    });
    if (group) this.records.addGroup(group);
    return plan.map((p) => p.record);
  }

  getSnapshot(id: string): SnapshotInfo {
    this.checkOpen();
    return snapshotInfo(this.records.snapshot(id));
  }

  findSnapshotByName(name: string): SnapshotInfo | undefined {
    this.checkOpen();
    const record = this.records.snapshotNamed(name);
    return record && snapshotInfo(record);
  }

  /** Snapshots in creation order, optionally of one source volume. */
  listSnapshots(filter: { sourceVolumeId?: string } = {}): SnapshotInfo[] {
    this.checkOpen();
    const all = [...this.records.snapshots.values()];
    const wanted =
      filter.sourceVolumeId === undefined ? all : all.filter((s) => s.sourceVolumeId === filter.sourceVolumeId);
    return wanted.map(snapshotInfo);
  }

  /**
   * Drops the snapshot's record; its layer is merged away by compaction once nothing needs it. Its change
   * record stays behind as a tombstone, so a delta from it stays exact until retention ends (invariant 8).
   */
  async deleteSnapshot(id: string): Promise<void> {
    this.checkOpen();
    const snap = this.records.snapshot(id);
    if (snap.groupId !== undefined) {
      throw new BusyError(`snapshot ${id} belongs to group snapshot ${snap.groupId}: delete the group instead`);
    }
    this.retireSnapshots([snap], () => undefined, `deleting snapshot ${id}`);
    this.records.removeSnapshot(id);
    this.afterDelete();
  }

  /**
   * Deletes snapshots' rows (with `alsoInTransaction`, e.g. their group's row) and leaves a change record for
   * each, expiring in the same transaction the oldest records of their volumes past the count limit. On a
   * full disk the records give way: the rows are deleted on the space reserve without them (a later delta
   * from such a base answers NOT_FOUND: take a full backup). Records in memory are the caller's to drop.
   */
  private retireSnapshots(snaps: readonly SnapshotRecord[], alsoInTransaction: () => void, what: string): void {
    const tombstones = snaps.map((snap) => this.newTombstone(snap));
    for (const t of tombstones) this.tombstones.add(t);
    let expiring: Tombstone[] = [];
    try {
      const volumes = new Set(snaps.map((snap) => snap.sourceVolumeId));
      expiring = [...volumes].flatMap((v) => this.tombstones.overCount(v));
      // Not on the reserve: that is kept for the delete itself (below) if this does not fit.
      this.catalog.transaction(() => {
        alsoInTransaction();
        for (const [i, snap] of snaps.entries()) {
          this.catalog.deleteSnapshot(snap.id);
          this.catalog.insertTombstone(tombstoneRow(tombstones[i]!));
        }
        for (const t of expiring) this.catalog.moveTombstone(t.snapshotId, t.anchorLayerId, null, null);
      });
    } catch (err) {
      for (const t of tombstones) this.tombstones.remove(t.snapshotId);
      if (!(err instanceof NoSpaceError)) throw err;
      expiring = [];
      this.space.freeing(what, () =>
        this.catalog.transaction(() => {
          alsoInTransaction();
          for (const snap of snaps) this.catalog.deleteSnapshot(snap.id);
        }),
      );
    }
    for (const snap of snaps) this.snapshotIo.delete(snap.id);
    for (const t of expiring) this.tombstones.applyMove(t, t.anchorLayerId, null, null);
  }

  /** A deleted snapshot's change record: anchored at its own layer, nothing changed after it yet. */
  private newTombstone(snap: SnapshotRecord): Tombstone {
    return {
      snapshotId: snap.id,
      sourceVolumeId: snap.sourceVolumeId,
      anchorLayerId: snap.layerId,
      changed: new Bitmap(),
      excluded: null,
      capacityBytes: snap.capacityBytes,
      blockSize: snap.blockSize,
      deletedAtMs: Date.now(),
    };
  }

  /** Reads a snapshot's bytes. */
  readSnapshot(snapshotId: string, offset: number, length: number): Buffer {
    this.checkOpen();
    const snap = this.records.snapshot(snapshotId);
    checkRange(offset, length, snap.capacityBytes, 'read');
    return this.snapshotReader(snap).read(offset, length);
  }

  /** A snapshot's read index, built on first use and kept for the few most recently read snapshots. */
  private snapshotReader(snap: SnapshotRecord): BlockIo {
    let io = this.snapshotIo.get(snap.id);
    if (io) {
      this.snapshotIo.delete(snap.id);
    } else {
      const top = this.layer(snap.layerId);
      io = new BlockIo(top, indexChain(chainOf(top.id, this.layers)), snap.blockSize);
      if (this.snapshotIo.size >= SNAPSHOT_IO_CACHE) this.snapshotIo.delete(this.snapshotIo.keys().next().value!);
    }
    this.snapshotIo.set(snap.id, io);
    return io;
  }

  // ---------------------------------------------------------------- metadata

  /** Blocks of the snapshot that hold data (their topmost entry is a write). */
  allocated(snapshotId: string, options: ExtentQueryOptions = {}): ExtentStream {
    this.checkOpen();
    const snap = this.records.snapshot(snapshotId);
    const query = extentQuery(options, snap.capacityBytes);
    const blocks = allocatedBlocks(chainOf(snap.layerId, this.layers), snap.capacityBytes / snap.blockSize);
    return extentStream(blocks, { ...query, capacityBytes: snap.capacityBytes, blockSize: snap.blockSize });
  }

  /**
   * Blocks written or trimmed after `base` up to and including `target`; base must be in target's chain.
   * A deleted base answers from its change record while retention lasts (HistoryGoneError after).
   */
  delta(baseSnapshotId: string, targetSnapshotId: string, options: ExtentQueryOptions = {}): ExtentStream {
    this.checkOpen();
    const target = this.records.snapshot(targetSnapshotId);
    const live = this.records.snapshots.get(baseSnapshotId);
    const tombstone = live ? undefined : this.tombstones.get(baseSnapshotId);
    if (!live && !tombstone) this.records.snapshot(baseSnapshotId);
    const query = extentQuery(options, target.capacityBytes);
    if (tombstone && !this.tombstones.usable(tombstone, Date.now())) {
      throw new HistoryGoneError(
        `base snapshot ${baseSnapshotId} was deleted and its change record has expired: take a full backup`,
      );
    }
    const baseLayerId = live ? live.layerId : tombstone!.anchorLayerId;
    // Only the layers between the two are visited: cost follows what changed, not the chain below the base.
    const between: Layer[] = [];
    let found = false;
    for (let id: number | null = target.layerId; id !== null; ) {
      if (id === baseLayerId) {
        found = true;
        break;
      }
      const layer = this.layer(id);
      between.push(layer);
      id = layer.parentId;
    }
    if (!found) {
      const reversed = chainOf(baseLayerId, this.layers).some((l) => l.id === target.layerId);
      throw new UnrelatedSnapshotsError(
        reversed
          ? `snapshot ${baseSnapshotId} was taken after ${target.id}: the base must be the earlier snapshot`
          : `snapshots ${baseSnapshotId} and ${target.id} do not share a history (neither volume was made from the other)`,
      );
    }
    const blocks = changedBlocks(between, target.capacityBytes / target.blockSize);
    if (tombstone?.changed) blocks.orInPlace(tombstone.changed);
    if (tombstone?.excluded) {
      const anchor = this.layer(tombstone.anchorLayerId);
      blocks.orInPlace(Bitmap.andNot(Bitmap.or(anchor.written, anchor.trimmed), tombstone.excluded));
    }
    clipBelow(blocks, target.capacityBytes / target.blockSize);
    return extentStream(blocks, { ...query, capacityBytes: target.capacityBytes, blockSize: target.blockSize });
  }

  // ---------------------------------------------------------------- space and compaction

  /** Merges hidden layers upward and drops unreferenced ones until nothing is left to do. */
  async compact(): Promise<CompactionReport> {
    this.checkOpen();
    const report = await this.compactor.run();
    // Done means the space is given back, not just scheduled to be.
    await this.files.settle();
    return report;
  }

  spaceUsage(): SpaceUsage {
    this.checkOpen();
    let layerBytes = 0;
    for (const layer of this.layers.values()) layerBytes += layer.allocatedBytes();
    let catalogBytes = 0;
    for (const suffix of ['', '-wal', '-shm']) {
      try {
        catalogBytes += fs.statSync(path.join(this.dir, `${CATALOG_FILE}${suffix}`)).blocks * 512;
      } catch {
        // The WAL and shared-memory files come and go with checkpoints.
      }
    }
    const referenced = this.records.referencedLayers();
    let hiddenLayers = 0;
    for (const id of this.layers.keys()) if (!referenced.has(id)) hiddenLayers++;
    return {
      layerBytes,
      catalogBytes,
      provisionedBytes: this.records.provisionedBytes(),
      capacityLimitBytes: this.capacityLimitBytes,
      volumes: this.records.volumes.size,
      snapshots: this.records.snapshots.size,
      layers: this.layers.size,
      hiddenLayers,
    };
  }

  /** Room left for volumes of `blockSize`-byte blocks, and the largest one the store can hold now. */
  capacity(blockSize: number): StoreCapacity {
    this.checkOpen();
    const state = { capacityLimitBytes: this.capacityLimitBytes, provisionedBytes: this.records.provisionedBytes() };
    return storeCapacity(this.fileSystem, state, checkBlockSize(blockSize));
  }

  /** Flushes every volume, stops compaction and closes the catalog. Later calls throw StoreClosedError. */
  close(): Promise<void> {
    this.closing ??= this.closeNow();
    return this.closing;
  }

  private async closeNow(): Promise<void> {
    if (this.closed) return;
    for (const session of [...this.directIo.values()]) session.revoke();
    await this.compactor.stop();
    await this.volumeLocks.drain();
    for (const vol of this.records.volumes.values()) {
      const head = this.layer(vol.headId);
      // On a full disk, committing writes already on disk may spend the reserve, so that close completes.
      await this.space.freeingAsync(`flushing volume ${vol.id}`, () => head.exclusive(() => this.commitHead(head)));
    }
    this.closed = true;
    for (const layer of this.layers.values()) layer.close();
    await this.files.dropSpare();
    this.catalog.close();
    await this.files.settle();
    this.releaseOwnership();
  }

  // ---------------------------------------------------------------- internals

  private checkOpen(): void {
    if (this.closed || this.closing) throw new StoreClosedError();
  }

  private layer(id: number): Layer {
    const layer = this.layers.get(id);
    if (!layer) throw new Error(`internal: layer ${id} is not loaded`);
    return layer;
  }

  private io(volumeId: string): BlockIo {
    const io = this.volumeIo.get(volumeId);
    if (!io) throw new Error(`internal: volume ${volumeId} has no I/O path`);
    return io;
  }

  /**
   * A layer leaves the store (dropped, merged into `into`, or a deleted volume's head): inside that
   * transaction, the change records anchored at it are deleted or moved. Returns the in-memory half.
   */
  private changeRecordsLeave(leaving: Layer, into: Layer | undefined): () => void {
    const anchored = this.tombstones.anchoredAt(leaving.id);
    if (!into) {
      if (anchored.length === 0) return () => undefined;
      // Nothing is above a dropped layer, so no later snapshot can be the target of these deltas.
      for (const t of anchored) this.catalog.deleteTombstone(t.snapshotId);
      return () => {
        for (const t of anchored) this.tombstones.remove(t.snapshotId);
      };
    }
    // Inside the merge's transaction, before the upper layer absorbs the lower one's blocks.
    const lowerBits = Bitmap.or(leaving.written, leaving.trimmed);
    const broughtIn = Bitmap.andNot(lowerBits, Bitmap.or(into.written, into.trimmed));
    const moves = anchored.length === 0 ? [] : this.tombstones.planMerge(leaving.id, lowerBits, broughtIn);
    // Records already anchored at the upper layer: the brought-in blocks are older than them, not changes.
    // Stored with their in-memory state, which writes to a live upper layer changed since its last commit
    // (committed by this merge too).
    const absorbed = this.tombstones.planAbsorb(into.id, broughtIn);
    for (const m of [...moves, ...absorbed]) {
      this.catalog.moveTombstone(m.tombstone.snapshotId, into.id, m.changed, m.excluded);
    }
    return () => {
      for (const m of [...moves, ...absorbed]) this.tombstones.applyMove(m.tombstone, into.id, m.changed, m.excluded);
      if (!into.frozen) this.watchIfAnchor(into);
    };
  }

  /** A live head anchoring change records: its writes to excluded blocks are changes (tombstones.ts). */
  private watchIfAnchor(layer: Layer): void {
    if (!this.tombstones.anchoredAt(layer.id).some((t) => t.excluded !== null)) return;
    layer.onTouched = (first, end) => this.tombstones.touched(layer.id, first, end);
  }

  /** Stores the change records anchored at a layer, inside the transaction that commits its bits. */
  private persistAnchoredAt(layerId: number): void {
    for (const t of this.tombstones.anchoredAt(layerId)) {
      if (t.excluded !== null) this.catalog.moveTombstone(t.snapshotId, t.anchorLayerId, t.changed, t.excluded);
    }
  }

  private readonly insertLayerRow = (parentId: number | null, blockSize: number): number =>
    this.catalog.insertLayer(parentId, blockSize, Date.now());

  /** Drops a layer from memory and disk after the catalog no longer names it. */
  private forgetLayer(layer: Layer): void {
    this.layers.delete(layer.id);
    this.files.forget(layer);
  }

  private afterDelete(): void {
    this.space.restore();
    if (this.autoCompact) this.compactor.schedule();
  }

  private compactionHost(): CompactionHost {
    return {
      catalog: this.catalog,
      layers: this.layers,
      referencedLayers: () => this.records.referencedLayers(),
      forgetLayer: (layer) => this.forgetLayer(layer),
      layerLeaving: (leaving, into) => this.changeRecordsLeave(leaving, into),
      holdDirectIoOff: (head) => {
        // A merge into a live head decides per block whether the head holds it: direct writes must wait.
        const vol = [...this.records.volumes.values()].find((v) => v.headId === head.id);
        if (!vol) return () => undefined;
        this.directIo.get(vol.id)?.revoke();
        this.directIoBlocked.set(vol.id, (this.directIoBlocked.get(vol.id) ?? 0) + 1);
        return () => {
          const n = (this.directIoBlocked.get(vol.id) ?? 1) - 1;
          if (n > 0) this.directIoBlocked.set(vol.id, n);
          else this.directIoBlocked.delete(vol.id);
        };
      },
      merged: (lower, upper) => {
        // Every index that had the lower layer's blocks now finds them in the upper one; direct I/O views that
        // name the lower layer's file (about to be unlinked) end.
        for (const [volumeId, io] of this.volumeIo) {
          if (io.index.holds(lower)) this.directIo.get(volumeId)?.revoke();
          io.index.relabel(lower, upper);
        }
        for (const io of this.snapshotIo.values()) io.index.relabel(lower, upper);
      },
    };
  }
}

function tombstoneRow(t: Tombstone): TombstoneRow {
  return {
    snapshot_id: t.snapshotId,
    source_volume_id: t.sourceVolumeId,
    anchor_layer_id: t.anchorLayerId,
    changed: null,
    expired: 0,
    counts_anchor: 0,
    excluded: null,
    capacity_bytes: t.capacityBytes,
    block_size: t.blockSize,
    deleted_at_ms: t.deletedAtMs,
  };
}

/** Opens the catalog with its file private to the store's owner (the WAL and shared-memory files follow its mode). */
function openCatalog(file: string): Catalog {
  fs.closeSync(fs.openSync(file, 'a', FILE_MODE));
  fs.chmodSync(file, FILE_MODE);
  return new Catalog(file);
}

function sourceBlockSize(asked: number | undefined, sourceBlockSize: number, what: string): number {
  if (asked !== undefined && asked !== sourceBlockSize) {
    throw new InvalidArgumentError(
      `block size ${asked} differs from ${what}'s ${sourceBlockSize}: a clone shares its source's blocks`,
    );
  }
  return sourceBlockSize;
}

function extentQuery(options: ExtentQueryOptions, capacityBytes: number) {
  if (options === null || typeof options !== 'object')
    throw new InvalidArgumentError('query options must be an object');
  const style = options.style ?? 'VARIABLE';
  if (style !== 'FIXED' && style !== 'VARIABLE') {
    throw new InvalidArgumentError(`extent style must be FIXED or VARIABLE, got ${String(style)}`);
  }
  return {
    style,
    batchSize: checkBatchSize(options.batchSize ?? DEFAULT_BATCH_SIZE),
    startingOffset: checkStartingOffset(options.startingOffset ?? 0, capacityBytes),
  } as const;
}
