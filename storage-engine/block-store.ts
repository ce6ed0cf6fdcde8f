/**
 * The block store: volumes as chains of copy-on-write layers, O(1) snapshots, clones that share
 * layers, and changed-block queries answered from per-layer bitmaps.
 *
 * Concurrency model (single Node thread):
 * - data operations (write, read, trim) are synchronous and never interleave with each other;
 * - structural operations on one volume (flush, snapshot, clone-from, grow, delete) queue on a
 *   per-volume mutex;
 * - every change to one layer's persisted bits queues on that layer's commit queue, and the last
 *   decision before a commit is always taken after the last await.
 */
import fs from 'node:fs';
import path from 'node:path';
import { Bitmap } from './bitmap.js';
import { Catalog, type SnapshotRow, type VolumeRow } from './catalog.js';
import { allocatedBlocks, changedBlocks, readThrough, readThroughInto } from './chain.js';
import { Compactor, type CompactionHost } from './compaction.js';
import {
  AlreadyExistsError,
  BusyError,
  InvalidArgumentError,
  NoSpaceError,
  NotFoundError,
  StoreClosedError,
  UnrelatedSnapshotsError,
  translateIoError,
} from './errors.js';
import { DEFAULT_BATCH_SIZE, extentStream, type ExtentStream } from './extent-stream.js';
import { isSnapshotId, isVolumeId, newSnapshotId, newVolumeId } from './ids.js';
import { KeyedMutex } from './keyed-mutex.js';
import { Layer } from './layer.js';
import { takeOwnership } from './owner-lock.js';
import { SpaceReserve } from './space-reserve.js';
import type {
  Attributes,
  CompactionReport,
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

interface VolumeRecord {
  id: string;
  name: string | undefined;
  capacityBytes: number;
  blockSize: number;
  headId: number;
  source: VolumeInfo['source'];
  attributes: Attributes;
  createdAtMs: number;
}

interface SnapshotRecord {
  id: string;
  name: string | undefined;
  sourceVolumeId: string;
  layerId: number;
  capacityBytes: number;
  blockSize: number;
  attributes: Attributes;
  createdAtMs: number;
}

const LAYER_DIR = 'layers';
const LAYER_FILE = /^(\d+)\.layer$/;

/** A copy-on-write block store rooted at one directory. */
export class BlockStore {
  private readonly catalog: Catalog;
  private readonly layers = new Map<number, Layer>();
  private readonly volumes = new Map<string, VolumeRecord>();
  private readonly snapshots = new Map<string, SnapshotRecord>();
  private readonly volumeLocks = new KeyedMutex();
  private readonly holds = new Map<string, Set<string>>();
  private readonly compactor: Compactor;
  private readonly space: SpaceReserve;
  private readonly defaultBlockSize: number;
  private readonly capacityLimitBytes: number | undefined;
  private readonly autoCompact: boolean;
  private closed = false;
  private readonly releaseOwnership: () => void;
  private readonly pendingUnlinks = new Set<Promise<void>>();
  private closing: Promise<void> | undefined;

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
    fs.mkdirSync(path.join(dir, LAYER_DIR), { recursive: true });
    this.releaseOwnership = takeOwnership(dir);
    try {
      this.space = new SpaceReserve(dir, options);
      this.catalog = new Catalog(path.join(dir, 'catalog.db'));
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
    for (const row of this.catalog.allLayers()) {
      const layerPath = this.layerPath(row.id);
      if (!fs.existsSync(layerPath)) {
        throw new Error(`catalog references layer ${row.id} but ${layerPath} is missing: the store is damaged`);
      }
      const stored = this.catalog.storedBitmaps(row.id);
      this.layers.set(
        row.id,
        new Layer(row.id, row.parent_id, row.block_size, layerPath, stored.written, stored.trimmed, row.frozen === 1),
      );
    }
    for (const row of this.catalog.allVolumes()) {
      this.volumes.set(row.id, {
        id: row.id,
        name: row.name ?? undefined,
        capacityBytes: row.capacity_bytes,
        blockSize: row.block_size,
        headId: row.head_layer_id,
        source:
          row.source_kind === 'snapshot'
            ? { kind: 'snapshot', snapshotId: row.source_id ?? '' }
            : row.source_kind === 'volume'
              ? { kind: 'volume', volumeId: row.source_id ?? '' }
              : undefined,
        attributes: JSON.parse(row.attributes) as Attributes,
        createdAtMs: row.created_at_ms,
      });
    }
    for (const row of this.catalog.allSnapshots()) {
      this.snapshots.set(row.id, {
        id: row.id,
        name: row.name ?? undefined,
        sourceVolumeId: row.source_volume_id,
        layerId: row.layer_id,
        capacityBytes: row.capacity_bytes,
        blockSize: row.block_size,
        attributes: JSON.parse(row.attributes) as Attributes,
        createdAtMs: row.created_at_ms,
      });
    }
    this.removeOrphanFiles();
  }

  /** Invariant 5: files the catalog does not know (a crash between file creation and commit, or between commit and unlink) go. */
  private removeOrphanFiles(): void {
    const dir = path.join(this.dir, LAYER_DIR);
    for (const entry of fs.readdirSync(dir)) {
      const match = LAYER_FILE.exec(entry);
      if (match && this.layers.has(Number(match[1]))) continue;
      fs.rmSync(path.join(dir, entry), { force: true, recursive: true });
    }
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
    let parentLayer: number | null = null;
    let source: VolumeInfo['source'];
    let minimumCapacity = 0;
    if (req.sourceSnapshotId !== undefined) {
      const snap = this.snapshotOrThrow(req.sourceSnapshotId);
      blockSize = this.sourceBlockSize(blockSize, snap.blockSize, `snapshot ${snap.id}`);
      parentLayer = snap.layerId;
      minimumCapacity = snap.capacityBytes;
      source = { kind: 'snapshot', snapshotId: snap.id };
    } else if (req.sourceVolumeId !== undefined) {
      const src = this.volumeOrThrow(req.sourceVolumeId);
      blockSize = this.sourceBlockSize(blockSize, src.blockSize, `volume ${src.id}`);
      minimumCapacity = src.capacityBytes;
      source = { kind: 'volume', volumeId: src.id };
    }
    blockSize ??= this.defaultBlockSize;
    const capacityBytes = checkCapacity(req.capacityBytes, blockSize);
    if (capacityBytes < minimumCapacity) {
      throw new InvalidArgumentError(
        `capacity ${capacityBytes} is smaller than the source's ${minimumCapacity} bytes`,
      );
    }
    const wanted = { name, capacityBytes, blockSize, source, attributes };
    const existing = this.sameNameVolume(wanted);
    if (existing) return existing;
    this.checkProvisioning(capacityBytes, 0);
    this.space.checkRoomToCreate('creating a volume');

    if (source?.kind === 'volume') {
      const srcId = source.volumeId;
      return this.volumeLocks.run(srcId, async () => {
        const src = this.volumeOrThrow(srcId);
        const head = this.layer(src.headId);
        return head.exclusive(async () => {
          const syncRest = await this.syncForFreeze(head);
          // Decisions from here on are taken after the last await.
          this.checkOpen();
          const again = this.sameNameVolume(wanted);
          if (again) return again;
          this.checkProvisioning(capacityBytes, 0);
          if (!this.volumes.has(srcId)) throw new NotFoundError(`volume ${srcId} was deleted`);
          syncRest();
          return this.cloneFromVolumeNow(src, head, wanted);
        });
      });
    }
    return this.insertVolume(wanted, parentLayer);
  }

  private sourceBlockSize(asked: number | undefined, sourceBlockSize: number, what: string): number {
    if (asked !== undefined && asked !== sourceBlockSize) {
      throw new InvalidArgumentError(
        `block size ${asked} differs from ${what}'s ${sourceBlockSize}: a clone shares its source's blocks`,
      );
    }
    return sourceBlockSize;
  }

  /** The existing volume of the same name if its arguments match; AlreadyExists if they do not. */
  private sameNameVolume(wanted: {
    name: string | undefined;
    capacityBytes: number;
    blockSize: number;
    source: VolumeInfo['source'];
    attributes: Attributes;
  }): VolumeInfo | undefined {
    if (wanted.name === undefined) return undefined;
    const existing = this.findVolumeRecordByName(wanted.name);
    if (!existing) return undefined;
    const same =
      existing.capacityBytes === wanted.capacityBytes &&
      existing.blockSize === wanted.blockSize &&
      JSON.stringify(existing.source ?? null) === JSON.stringify(wanted.source ?? null) &&
      sameAttributes(existing.attributes, wanted.attributes);
    if (!same) {
      throw new AlreadyExistsError(`a volume named ${JSON.stringify(wanted.name)} exists with different properties`);
    }
    return volumeInfo(existing);
  }

  private insertVolume(
    wanted: { name: string | undefined; capacityBytes: number; blockSize: number; source: VolumeInfo['source']; attributes: Attributes },
    parentLayer: number | null,
  ): VolumeInfo {
    const record: VolumeRecord = {
      id: newVolumeId(),
      name: wanted.name,
      capacityBytes: wanted.capacityBytes,
      blockSize: wanted.blockSize,
      headId: -1,
      source: wanted.source,
      attributes: wanted.attributes,
      createdAtMs: Date.now(),
    };
    const head = this.withNewLayerFiles((newLayer) =>
      this.catalog.transaction(() => {
        const layer = newLayer(parentLayer, record.blockSize);
        record.headId = layer.id;
        this.catalog.insertVolume(volumeRow(record));
        return layer;
      }),
    );
    this.layers.set(head.id, head);
    this.volumes.set(record.id, record);
    return volumeInfo(record);
  }

  /** Freezes the source's head into a shared hidden layer; source and clone each get a new head on it. */
  private cloneFromVolumeNow(
    src: VolumeRecord,
    head: Layer,
    wanted: { name: string | undefined; capacityBytes: number; blockSize: number; source: VolumeInfo['source']; attributes: Attributes },
  ): VolumeInfo {
    const record: VolumeRecord = {
      id: newVolumeId(),
      name: wanted.name,
      capacityBytes: wanted.capacityBytes,
      blockSize: wanted.blockSize,
      headId: -1,
      source: wanted.source,
      attributes: wanted.attributes,
      createdAtMs: Date.now(),
    };
    const [srcHead, cloneHead] = this.withNewLayerFiles((newLayer) =>
      this.catalog.transaction(() => {
        this.catalog.freezeLayer(head.id, head.written, head.trimmed);
        const a = newLayer(head.id, src.blockSize);
        const b = newLayer(head.id, src.blockSize);
        this.catalog.setVolumeHead(src.id, a.id);
        record.headId = b.id;
        this.catalog.insertVolume(volumeRow(record));
        return [a, b] as const;
      }),
    );
    head.frozen = true;
    head.dirty = new Bitmap();
    this.layers.set(srcHead.id, srcHead);
    this.layers.set(cloneHead.id, cloneHead);
    src.headId = srcHead.id;
    this.volumes.set(record.id, record);
    return volumeInfo(record);
  }

  getVolume(id: string): VolumeInfo {
    this.checkOpen();
    return volumeInfo(this.volumeOrThrow(id));
  }

  findVolumeByName(name: string): VolumeInfo | undefined {
    this.checkOpen();
    const record = this.findVolumeRecordByName(name);
    return record && volumeInfo(record);
  }

  /** Volumes in creation order. */
  listVolumes(): VolumeInfo[] {
    this.checkOpen();
    return [...this.volumes.values()].map(volumeInfo);
  }

  /** Deletes a volume; its snapshots stay, and their layers stay until nothing needs them. */
  async deleteVolume(id: string): Promise<void> {
    this.checkOpen();
    this.volumeOrThrow(id);
    this.checkNotHeld(id);
    await this.volumeLocks.run(id, async () => {
      const vol = this.volumeOrThrow(id);
      const head = this.layer(vol.headId);
      await head.exclusive(() => {
        this.checkOpen();
        this.checkNotHeld(id);
        this.space.freeing(`deleting volume ${id}`, () =>
          this.catalog.transaction(() => {
            this.catalog.deleteVolume(id);
            this.catalog.deleteLayer(head.id);
          }),
        );
        this.volumes.delete(id);
        this.forgetLayer(head);
      });
    });
    await Promise.all(this.pendingUnlinks);
    this.afterDelete();
  }

  /** Grows a volume's virtual capacity (never shrinks: data past a smaller end would be lost). */
  async growVolume(id: string, capacityBytes: number): Promise<VolumeInfo> {
    this.checkOpen();
    const vol = this.volumeOrThrow(id);
    checkCapacity(capacityBytes, vol.blockSize);
    return this.volumeLocks.run(id, () => {
      this.checkOpen();
      const current = this.volumeOrThrow(id);
      if (capacityBytes < current.capacityBytes) {
        throw new InvalidArgumentError(
          `volume ${id} has ${current.capacityBytes} bytes; shrinking to ${capacityBytes} is not supported`,
        );
      }
      if (capacityBytes === current.capacityBytes) return volumeInfo(current);
      this.checkProvisioning(capacityBytes, current.capacityBytes);
      this.catalog.setVolumeCapacity(id, capacityBytes);
      current.capacityBytes = capacityBytes;
      return volumeInfo(current);
    });
  }

  /** Marks a volume in use by `holder`; it cannot be deleted until every holder releases it. */
  hold(volumeId: string, holder: string): void {
    this.checkOpen();
    this.volumeOrThrow(volumeId);
    let set = this.holds.get(volumeId);
    if (!set) this.holds.set(volumeId, (set = new Set()));
    set.add(holder);
  }

  release(volumeId: string, holder: string): void {
    const set = this.holds.get(volumeId);
    set?.delete(holder);
    if (set && set.size === 0) this.holds.delete(volumeId);
  }

  // ---------------------------------------------------------------- data

  /** Writes bytes at any offset; partial blocks the head does not hold are filled from the layers below. */
  write(volumeId: string, offset: number, data: Uint8Array): void {
    this.checkOpen();
    const vol = this.volumeOrThrow(volumeId);
    if (!(data instanceof Uint8Array)) throw new InvalidArgumentError('write data must be bytes');
    checkRange(offset, data.length, vol.capacityBytes, 'write');
    if (data.length === 0) return;
    const head = this.layer(vol.headId);
    const B = vol.blockSize;
    const end = offset + data.length;
    let pos = offset;
    while (pos < end) {
      const block = Math.floor(pos / B);
      const blockStart = block * B;
      if (pos === blockStart && end - pos >= B) {
        // Whole blocks: one pwrite for the aligned middle of the request.
        const blocks = Math.floor((end - pos) / B);
        const bytes = blocks * B;
        head.writeAt(data.subarray(pos - offset, pos - offset + bytes), pos);
        head.markWritten(block, block + blocks);
        pos += bytes;
        continue;
      }
      const pieceEnd = Math.min(end, blockStart + B);
      const piece = data.subarray(pos - offset, pieceEnd - offset);
      if (head.written.has(block)) {
        head.writeAt(piece, pos);
      } else {
        // Copy-on-write of a partial block: the rest of it comes from whoever answers for it now.
        const full = Buffer.alloc(B);
        if (!head.trimmed.has(block)) readThroughInto(this.chainOf(head.parentId), B, blockStart, full, 0, B);
        full.set(piece, pos - blockStart);
        head.writeAt(full, blockStart);
      }
      head.markWritten(block, block + 1);
      pos = pieceEnd;
    }
  }

  /** Reads bytes at any offset; never-written and trimmed ranges read as zeros. */
  read(volumeId: string, offset: number, length: number): Buffer {
    this.checkOpen();
    const vol = this.volumeOrThrow(volumeId);
    checkRange(offset, length, vol.capacityBytes, 'read');
    return readThrough(this.chainOf(vol.headId), vol.blockSize, offset, length);
  }

  /** Trims a range: whole blocks become zeros recorded as trims, partial edges are overwritten with zeros. */
  trim(volumeId: string, offset: number, length: number): void {
    this.checkOpen();
    const vol = this.volumeOrThrow(volumeId);
    checkRange(offset, length, vol.capacityBytes, 'trim');
    if (length === 0) return;
    const B = vol.blockSize;
    const end = offset + length;
    const firstWhole = Math.ceil(offset / B);
    const endWhole = Math.floor(end / B);
    if (firstWhole >= endWhole) {
      this.write(volumeId, offset, new Uint8Array(length));
      return;
    }
    if (offset < firstWhole * B) this.write(volumeId, offset, new Uint8Array(firstWhole * B - offset));
    if (end > endWhole * B) this.write(volumeId, endWhole * B, new Uint8Array(end - endWhole * B));
    this.layer(vol.headId).markTrimmed(firstWhole, endWhole);
  }

  /** Makes every completed write and trim of the volume durable (survives kill -9 and power loss). */
  async flush(volumeId: string): Promise<void> {
    this.checkOpen();
    this.volumeOrThrow(volumeId);
    await this.volumeLocks.run(volumeId, async () => {
      const vol = this.volumeOrThrow(volumeId);
      const head = this.layer(vol.headId);
      await head.exclusive(() => this.flushInner(head));
    });
  }

  /** Data first, then the bits that make it visible (invariant 3). Runs inside the layer's commit queue. */
  private async flushInner(layer: Layer): Promise<void> {
    if (layer.dirty.isEmpty) return;
    const dirty = layer.dirty;
    layer.dirty = new Bitmap();
    const setWritten = Bitmap.and(dirty, layer.written);
    const setTrimmed = Bitmap.and(dirty, layer.trimmed);
    try {
      await layer.syncData();
      if (!this.layers.has(layer.id) || layer.frozen) return;
      this.catalog.appendJournal(layer.id, setWritten, setTrimmed);
    } catch (err) {
      layer.dirty.orInPlace(dirty);
      translateIoError(err, `flushing layer ${layer.id}`);
    }
  }

  /**
   * Makes a head's data durable ahead of freezing it, without blocking the event loop for the bulk of it.
   * Returns a check to call after the last await: it syncs again, synchronously, only if writes landed
   * meanwhile. The freeze then stores the complete bitmaps, so no journal commit is needed first.
   */
  private async syncForFreeze(head: Layer): Promise<() => void> {
    const seq = head.writeSeq;
    try {
      if (!head.dirty.isEmpty) await head.syncData();
    } catch (err) {
      translateIoError(err, `flushing layer ${head.id}`);
    }
    return () => {
      if (head.writeSeq === seq) return;
      try {
        head.syncDataNow();
      } catch (err) {
        translateIoError(err, `flushing layer ${head.id}`);
      }
    };
  }

  // ---------------------------------------------------------------- snapshots

  /** Flushes the volume and freezes its head as the snapshot's layer: constant time whatever the size. */
  async createSnapshot(req: CreateSnapshotRequest): Promise<SnapshotInfo> {
    this.checkOpen();
    if (req === null || typeof req !== 'object') throw new InvalidArgumentError('a snapshot request is required');
    const name = checkName(req.name, 'snapshot');
    const attributes = checkAttributes(req.attributes);
    this.volumeOrThrow(req.volumeId);
    const existing = this.sameNameSnapshot(name, req.volumeId);
    if (existing) return existing;
    this.space.checkRoomToCreate('creating a snapshot');
    return this.volumeLocks.run(req.volumeId, async () => {
      const vol = this.volumeOrThrow(req.volumeId);
      const head = this.layer(vol.headId);
      return head.exclusive(async () => {
        const syncRest = await this.syncForFreeze(head);
        this.checkOpen();
        const again = this.sameNameSnapshot(name, vol.id);
        if (again) return again;
        syncRest();
        const record: SnapshotRecord = {
          id: newSnapshotId(),
          name,
          sourceVolumeId: vol.id,
          layerId: head.id,
          capacityBytes: vol.capacityBytes,
          blockSize: vol.blockSize,
          attributes,
          createdAtMs: Date.now(),
        };
        const newHead = this.withNewLayerFiles((newLayer) =>
          this.catalog.transaction(() => {
            this.catalog.freezeLayer(head.id, head.written, head.trimmed);
            const layer = newLayer(head.id, vol.blockSize);
            this.catalog.setVolumeHead(vol.id, layer.id);
            this.catalog.insertSnapshot(snapshotRow(record));
            return layer;
          }),
        );
        head.frozen = true;
        head.dirty = new Bitmap();
        this.layers.set(newHead.id, newHead);
        vol.headId = newHead.id;
        this.snapshots.set(record.id, record);
        return snapshotInfo(record);
      });
    });
  }

  private sameNameSnapshot(name: string | undefined, volumeId: string): SnapshotInfo | undefined {
    if (name === undefined) return undefined;
    const existing = this.findSnapshotRecordByName(name);
    if (!existing) return undefined;
    if (existing.sourceVolumeId !== volumeId) {
      throw new AlreadyExistsError(
        `a snapshot named ${JSON.stringify(name)} exists for another volume (${existing.sourceVolumeId})`,
      );
    }
    return snapshotInfo(existing);
  }

  getSnapshot(id: string): SnapshotInfo {
    this.checkOpen();
    return snapshotInfo(this.snapshotOrThrow(id));
  }

  findSnapshotByName(name: string): SnapshotInfo | undefined {
    this.checkOpen();
    const record = this.findSnapshotRecordByName(name);
    return record && snapshotInfo(record);
  }

  /** Snapshots in creation order, optionally of one source volume. */
  listSnapshots(filter: { sourceVolumeId?: string } = {}): SnapshotInfo[] {
    this.checkOpen();
    const all = [...this.snapshots.values()];
    return (filter.sourceVolumeId === undefined ? all : all.filter((s) => s.sourceVolumeId === filter.sourceVolumeId)).map(
      snapshotInfo,
    );
  }

  /** Drops the snapshot's record; its layer is merged away by compaction once nothing needs it. */
  async deleteSnapshot(id: string): Promise<void> {
    this.checkOpen();
    this.snapshotOrThrow(id);
    this.space.freeing(`deleting snapshot ${id}`, () => this.catalog.deleteSnapshot(id));
    this.snapshots.delete(id);
    this.afterDelete();
  }

  /** Reads a snapshot's bytes. */
  readSnapshot(snapshotId: string, offset: number, length: number): Buffer {
    this.checkOpen();
    const snap = this.snapshotOrThrow(snapshotId);
    checkRange(offset, length, snap.capacityBytes, 'read');
    return readThrough(this.chainOf(snap.layerId), snap.blockSize, offset, length);
  }

  // ---------------------------------------------------------------- metadata

  /** Blocks of the snapshot that hold data (their topmost entry is a write). */
  allocated(snapshotId: string, options: ExtentQueryOptions = {}): ExtentStream {
    this.checkOpen();
    const snap = this.snapshotOrThrow(snapshotId);
    const query = extentQuery(options, snap.capacityBytes);
    const blocks = allocatedBlocks(this.chainOf(snap.layerId), snap.capacityBytes / snap.blockSize);
    return extentStream(blocks, { ...query, capacityBytes: snap.capacityBytes, blockSize: snap.blockSize });
  }

  /** Blocks written or trimmed after `base` up to and including `target`; base must be in target's chain. */
  delta(baseSnapshotId: string, targetSnapshotId: string, options: ExtentQueryOptions = {}): ExtentStream {
    this.checkOpen();
    const base = this.snapshotOrThrow(baseSnapshotId);
    const target = this.snapshotOrThrow(targetSnapshotId);
    const query = extentQuery(options, target.capacityBytes);
    const chain = this.chainOf(target.layerId);
    const at = chain.findIndex((l) => l.id === base.layerId);
    if (at < 0) {
      const reversed = this.chainOf(base.layerId).some((l) => l.id === target.layerId);
      throw new UnrelatedSnapshotsError(
        reversed
          ? `snapshot ${base.id} was taken after ${target.id}: the base must be the earlier snapshot`
          : `snapshots ${base.id} and ${target.id} do not share a history (neither volume was made from the other)`,
      );
    }
    const blocks = changedBlocks(chain.slice(0, at), target.capacityBytes / target.blockSize);
    return extentStream(blocks, { ...query, capacityBytes: target.capacityBytes, blockSize: target.blockSize });
  }

  // ---------------------------------------------------------------- space and compaction

  /** Merges hidden layers upward and drops unreferenced ones until nothing is left to do. */
  async compact(): Promise<CompactionReport> {
    this.checkOpen();
    const report = await this.compactor.run();
    // Done means the space is given back, not just scheduled to be.
    await Promise.all(this.pendingUnlinks);
    return report;
  }

  spaceUsage(): SpaceUsage {
    this.checkOpen();
    let layerBytes = 0;
    for (const layer of this.layers.values()) layerBytes += layer.allocatedBytes();
    let catalogBytes = 0;
    for (const suffix of ['', '-wal', '-shm']) {
      try {
        catalogBytes += fs.statSync(path.join(this.dir, `catalog.db${suffix}`)).blocks * 512;
      } catch {
        // The WAL and shared-memory files come and go with checkpoints.
      }
    }
    const referenced = this.referencedLayers();
    let hiddenLayers = 0;
    for (const id of this.layers.keys()) if (!referenced.has(id)) hiddenLayers++;
    return {
      layerBytes,
      catalogBytes,
      provisionedBytes: this.provisionedBytes(),
      capacityLimitBytes: this.capacityLimitBytes,
      volumes: this.volumes.size,
      snapshots: this.snapshots.size,
      layers: this.layers.size,
      hiddenLayers,
    };
  }

  /** Flushes every volume, stops compaction and closes the catalog. Later calls throw StoreClosedError. */
  close(): Promise<void> {
    this.closing ??= this.closeNow();
    return this.closing;
  }

  private async closeNow(): Promise<void> {
    if (this.closed) return;
    await this.compactor.stop();
    await this.volumeLocks.drain();
    for (const vol of this.volumes.values()) {
      const head = this.layer(vol.headId);
      // On a full disk, committing writes already on disk may spend the reserve, so that close completes.
      await this.space.freeingAsync(`flushing volume ${vol.id}`, () => head.exclusive(() => this.flushInner(head)));
    }
    this.closed = true;
    for (const layer of this.layers.values()) layer.close();
    this.catalog.close();
    await Promise.all(this.pendingUnlinks);
    this.releaseOwnership();
  }

  // ---------------------------------------------------------------- internals

  private checkOpen(): void {
    if (this.closed || this.closing) throw new StoreClosedError();
  }

  private layerPath(id: number): string {
    return path.join(this.dir, LAYER_DIR, `${id}.layer`);
  }

  private layer(id: number): Layer {
    const layer = this.layers.get(id);
    if (!layer) throw new Error(`internal: layer ${id} is not loaded`);
    return layer;
  }

  /** Layers from `top` down to the root. */
  private chainOf(top: number | null): Layer[] {
    const chain: Layer[] = [];
    for (let id = top; id !== null; ) {
      const layer = this.layer(id);
      chain.push(layer);
      id = layer.parentId;
    }
    return chain;
  }

  private volumeOrThrow(id: string): VolumeRecord {
    const vol = isVolumeId(id) ? this.volumes.get(id) : undefined;
    if (!vol) throw new NotFoundError(`volume ${JSON.stringify(String(id).slice(0, 128))} does not exist`);
    return vol;
  }

  private snapshotOrThrow(id: string): SnapshotRecord {
    const snap = isSnapshotId(id) ? this.snapshots.get(id) : undefined;
    if (!snap) throw new NotFoundError(`snapshot ${JSON.stringify(String(id).slice(0, 128))} does not exist`);
    return snap;
  }

  private findVolumeRecordByName(name: string): VolumeRecord | undefined {
    for (const vol of this.volumes.values()) if (vol.name === name) return vol;
    return undefined;
  }

  private findSnapshotRecordByName(name: string): SnapshotRecord | undefined {
    for (const snap of this.snapshots.values()) if (snap.name === name) return snap;
    return undefined;
  }

  private checkNotHeld(id: string): void {
    const holders = this.holds.get(id);
    if (holders && holders.size > 0) {
      throw new BusyError(`volume ${id} is in use by ${[...holders].join(', ')}`);
    }
  }

  private provisionedBytes(): number {
    let total = 0;
    for (const vol of this.volumes.values()) total += vol.capacityBytes;
    return total;
  }

  /** Refuses provisioning past the store's limit (replacing `current` bytes with `wanted`). */
  private checkProvisioning(wanted: number, current: number): void {
    if (this.capacityLimitBytes === undefined) return;
    const after = this.provisionedBytes() - current + wanted;
    if (after > this.capacityLimitBytes) {
      throw new NoSpaceError(
        `provisioning ${wanted} bytes would take the store to ${after} of its ${this.capacityLimitBytes} bytes`,
      );
    }
  }

  private referencedLayers(): Set<number> {
    const referenced = new Set<number>();
    for (const vol of this.volumes.values()) referenced.add(vol.headId);
    for (const snap of this.snapshots.values()) referenced.add(snap.layerId);
    return referenced;
  }

  /**
   * Runs a catalog change that needs new layer files. Each file exists (and its directory entry is
   * durable) before the transaction that names it commits; if the change fails, the files go again.
   */
  private withNewLayerFiles<T>(change: (newLayer: (parentId: number | null, blockSize: number) => Layer) => T): T {
    const created: Layer[] = [];
    const newLayer = (parentId: number | null, blockSize: number): Layer => {
      const id = this.catalog.insertLayer(parentId, blockSize, Date.now());
      const layerPath = this.layerPath(id);
      try {
        fs.closeSync(fs.openSync(layerPath, 'w'));
      } catch (err) {
        translateIoError(err, `creating layer ${id}`);
      }
      const layer = new Layer(id, parentId, blockSize, layerPath, new Bitmap(), new Bitmap(), false);
      created.push(layer);
      // Runs inside the transaction, before its commit: the directory entry is durable first.
      this.syncLayerDir();
      return layer;
    };
    try {
      return change(newLayer);
    } catch (err) {
      for (const layer of created) fs.rmSync(layer.path, { force: true });
      throw err;
    }
  }

  private syncLayerDir(): void {
    const fd = fs.openSync(path.join(this.dir, LAYER_DIR), 'r');
    try {
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
  }

  /**
   * Drops a layer from memory and disk after the catalog no longer names it. The unlink is asynchronous:
   * freeing a large scattered file can take seconds (more with online discard), and nothing may stall the
   * event loop that serves I/O. A crash before it completes leaves an orphan that start-up removes.
   */
  private forgetLayer(layer: Layer): void {
    this.layers.delete(layer.id);
    layer.close();
    const unlink = fs.promises.rm(layer.path, { force: true }).catch(() => undefined);
    this.pendingUnlinks.add(unlink);
    void unlink.finally(() => this.pendingUnlinks.delete(unlink));
  }

  private afterDelete(): void {
    this.space.restore();
    if (this.autoCompact) this.compactor.schedule();
  }

  private compactionHost(): CompactionHost {
    return {
      catalog: this.catalog,
      layers: this.layers,
      referencedLayers: () => this.referencedLayers(),
      forgetLayer: (layer) => this.forgetLayer(layer),
    };
  }
}

function extentQuery(options: ExtentQueryOptions, capacityBytes: number) {
  if (options === null || typeof options !== 'object') throw new InvalidArgumentError('query options must be an object');
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

function sameAttributes(a: Attributes, b: Attributes): boolean {
  const ka = Object.keys(a).sort();
  const kb = Object.keys(b).sort();
  return ka.length === kb.length && ka.every((k, i) => k === kb[i] && a[k] === b[k]);
}

function volumeInfo(v: VolumeRecord): VolumeInfo {
  return {
    id: v.id,
    name: v.name,
    capacityBytes: v.capacityBytes,
    blockSize: v.blockSize,
    source: v.source && { ...v.source },
    attributes: { ...v.attributes },
    createdAtMs: v.createdAtMs,
  };
}

function snapshotInfo(s: SnapshotRecord): SnapshotInfo {
  return {
    id: s.id,
    name: s.name,
    sourceVolumeId: s.sourceVolumeId,
    capacityBytes: s.capacityBytes,
    blockSize: s.blockSize,
    attributes: { ...s.attributes },
    createdAtMs: s.createdAtMs,
  };
}

function volumeRow(v: VolumeRecord): VolumeRow {
  return {
    id: v.id,
    name: v.name ?? null,
    capacity_bytes: v.capacityBytes,
    block_size: v.blockSize,
    head_layer_id: v.headId,
    source_kind: v.source?.kind ?? null,
    source_id: v.source ? (v.source.kind === 'snapshot' ? v.source.snapshotId : v.source.volumeId) : null,
    attributes: JSON.stringify(v.attributes),
    created_at_ms: v.createdAtMs,
  };
}

function snapshotRow(s: SnapshotRecord): SnapshotRow {
  return {
    id: s.id,
    name: s.name ?? null,
    source_volume_id: s.sourceVolumeId,
    layer_id: s.layerId,
    capacity_bytes: s.capacityBytes,
    block_size: s.blockSize,
    attributes: JSON.stringify(s.attributes),
    created_at_ms: s.createdAtMs,
  };
}

