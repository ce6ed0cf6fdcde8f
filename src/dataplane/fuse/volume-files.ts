/**
 * The file system the node data plane mounts: a flat root directory holding one regular file per exposed
 * volume. A file's size is the volume's capacity and its bytes are the volume's bytes: reads, writes,
 * fsync and hole punching go straight to the block store. The loop device attached to the file is what
 * pods see.
 *
 * Files are opened for direct I/O (FOPEN_DIRECT_IO): the loop device already does its own caching above
 * us, and a second copy in the FUSE page cache would both waste memory and hide writes from fsync order.
 */
import { constants as fsConstants } from 'node:fs';
import type { BlockStore } from '../../../storage-engine/index.js';
import { EngineError } from '../../../storage-engine/index.js';
import { DirectIoRouter, type DirectIoLogger } from './direct-io-host.js';
import {
  FuseError,
  type AttrChanges,
  type FuseNotifier,
  type LookupResult,
  type NotifyingFilesystem,
  type OpenResult,
} from './filesystem.js';
import {
  DT_DIR,
  DT_REG,
  Errno,
  FallocMode,
  FUSE_ROOT_ID,
  OpenOutFlag,
  S_IFDIR,
  S_IFREG,
  type Attr,
  type Dirent,
  type Statfs,
} from './protocol.js';
import type { IoThreadLink } from './io-threads.js';

/**
 * The block store calls the files need; BlockStore provides them (tests may wrap it). Without
 * `openDirectIo` every read and write is served on the main thread.
 */
export type VolumeBackend = Pick<
  BlockStore,
  'getVolume' | 'read' | 'write' | 'trim' | 'flush' | 'growVolume' | 'hold' | 'release'
> &
  Partial<Pick<BlockStore, 'openDirectIo'>>;

/** File names: what a volume ID looks like, and nothing that could be a path or a dot entry. */
const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$/;

export function isValidFileName(name: string): boolean {
  return NAME_PATTERN.test(name);
}

const STATFS_BLOCK = 4096;

interface FileNode {
  nodeid: number;
  name: string;
  volumeId: string;
  /** Kernel references from LOOKUP replies not yet forgotten. */
  lookups: number;
  openHandles: Set<number>;
  /** Taken out of the directory; kept while the kernel still references it or a handle is open. */
  removed: boolean;
}

export interface VolumeFilesOptions {
  /** The holder name used with BlockStore.hold() while a volume is exposed. Default "fuse". */
  holder?: string;
  /**
   * Whether the I/O threads may answer a volume's reads and writes themselves (default: every volume). A
   * volume for which this says no is served by the main thread's dispatcher, where requests are admitted;
   * call `reconsiderDirectIo` when the answer changes.
   */
  serveDirectly?: (volumeId: string) => boolean;
}

export class VolumeFiles implements NotifyingFilesystem {
  private readonly byName = new Map<string, FileNode>();
  private readonly byNode = new Map<number, FileNode>();
  private readonly handles = new Map<number, FileNode>();
  /** Directory handles: the listing taken at OPENDIR, so paging through it stays consistent. */
  private readonly dirHandles = new Map<number, Dirent[]>();
  private nextNode = FUSE_ROOT_ID + 1;
  private nextHandle = 1;
  private notifier: FuseNotifier | undefined;
  /** Lets the I/O threads serve reads and writes of open files themselves (direct-io-host.ts). */
  private directIo: DirectIoRouter | undefined;
  private readonly holder: string;
  private readonly serveDirectly: ((volumeId: string) => boolean) | undefined;
  private readonly mountedAtMs = Date.now();

  constructor(
    private readonly store: VolumeBackend,
    options: VolumeFilesOptions = {},
  ) {
    this.holder = options.holder ?? 'fuse';
    this.serveDirectly = options.serveDirectly;
  }

  attachNotifier(notifier: FuseNotifier | undefined): void {
    this.notifier = notifier;
  }

  /**
   * The mount's I/O threads are up (or, with undefined, stopping): serve open files through them. `logger`
   * hears of sessions that fail to start or to apply.
   */
  attachIoThreads(threads: IoThreadLink | undefined, logger: DirectIoLogger = { warn() {} }): void {
    this.directIo?.close();
    this.directIo = undefined;
    const store = this.store;
    if (threads && store.openDirectIo) {
      this.directIo = new DirectIoRouter(
        { openDirectIo: (id, host) => store.openDirectIo!(id, host) },
        threads,
        logger,
        this.serveDirectly,
      );
      for (const [fh, node] of this.handles) this.directIo.opened(fh, node.nodeid, node.volumeId);
    }
  }

  // ---------------------------------------------------------------- owner API

  /**
   * Exposes `volumeId` as the file `name` and holds the volume in the store so it cannot be deleted while
   * exposed. Adding the same name for the same volume again is a no-op.
   */
  add(name: string, volumeId: string): void {
    if (!isValidFileName(name)) throw new RangeError(`invalid file name ${JSON.stringify(name)}`);
    const existing = this.byName.get(name);
    if (existing) {
      if (existing.volumeId === volumeId) return;
      throw new RangeError(`file ${name} already exposes volume ${existing.volumeId}`);
    }
    this.store.getVolume(volumeId); // throws NotFoundError for unknown IDs
    this.store.hold(volumeId, this.holder);
    const node: FileNode = {
      nodeid: this.nextNode++,
      name,
      volumeId,
      lookups: 0,
      openHandles: new Set(),
      removed: false,
    };
    this.byName.set(name, node);
    this.byNode.set(node.nodeid, node);
  }

  /**
   * Takes `name` out of the directory. Handles already open (a loop device) keep working until closed,
   * like an unlinked file; the store hold is released once the last one is. Resolves once the kernel has
   * been told to forget the name. Returns false if there was no such file.
   */
  async remove(name: string): Promise<boolean> {
    const node = this.byName.get(name);
    if (!node) return false;
    this.byName.delete(name);
    node.removed = true;
    this.maybeDrop(node);
    await this.notifier?.invalidateEntry(FUSE_ROOT_ID, name);
    return true;
  }

  /** Grows the volume behind `name` and tells the kernel its size changed (for `losetup -c`). */
  async grow(name: string, capacityBytes: number): Promise<void> {
    const node = this.byName.get(name);
    if (!node) throw new RangeError(`no file ${name}`);
    await this.store.growVolume(node.volumeId, capacityBytes);
    await this.notifier?.invalidateInode(node.nodeid);
  }

  /** `serveDirectly` may answer differently for the volume now (its I/O limits changed). */
  reconsiderDirectIo(volumeId: string): void {
    this.directIo?.reconsider(volumeId);
  }

  /** Names currently in the directory, in the order they were added. */
  names(): string[] {
    return [...this.byName.keys()];
  }

  /** Open handles on the file `name` (e.g. a loop device), 0 if none or no such file. */
  openCount(name: string): number {
    return this.byName.get(name)?.openHandles.size ?? 0;
  }

  /** The volume behind a node ID the kernel uses, or undefined (the root, or a node it no longer has). */
  volumeOfNode(nodeid: number): string | undefined {
    return this.byNode.get(nodeid)?.volumeId;
  }

  /** Whether the store volume is still held by a removed-but-open file (or an exposed one). */
  isExposed(volumeId: string): boolean {
    for (const n of this.byNode.values()) if (n.volumeId === volumeId) return true;
    return false;
  }

  private maybeDrop(node: FileNode): void {
    if (!node.removed || node.openHandles.size > 0 || node.lookups > 0) return;
    if (this.byNode.delete(node.nodeid)) {
      // Another exposure of the same volume (re-added under the same or another name) keeps its hold.
      if (!this.isExposed(node.volumeId)) this.store.release(node.volumeId, this.holder);
    }
  }

  // ---------------------------------------------------------------- FUSE operations

  private node(nodeid: number): FileNode {
    const n = this.byNode.get(nodeid);
    if (!n) throw new FuseError(Errno.ENOENT);
    return n;
  }

  private handle(nodeid: number, fh: number): FileNode {
    const n = this.handles.get(fh);
    if (!n || n.nodeid !== nodeid) throw new FuseError(Errno.EBADF);
    return n;
  }

  private rootAttr(): Attr {
    return {
      ino: FUSE_ROOT_ID,
      size: 0,
      blocks: 0,
      atimeMs: this.mountedAtMs,
      mtimeMs: this.mountedAtMs,
      ctimeMs: this.mountedAtMs,
      mode: S_IFDIR | 0o755,
      nlink: 2,
      uid: 0,
      gid: 0,
      blksize: STATFS_BLOCK,
    };
  }

  private fileAttr(node: FileNode): Attr {
    const v = this.engine(() => this.store.getVolume(node.volumeId));
    return {
      ino: node.nodeid,
      size: v.capacityBytes,
      blocks: Math.ceil(v.capacityBytes / 512),
      atimeMs: v.createdAtMs,
      mtimeMs: v.createdAtMs,
      ctimeMs: v.createdAtMs,
      mode: S_IFREG | 0o600,
      nlink: node.removed ? 0 : 1,
      uid: 0,
      gid: 0,
      blksize: v.blockSize,
    };
  }

  /** Runs an engine call, turning its typed errors into errnos. */
  private engine<T>(call: () => T): T {
    try {
      return call();
    } catch (err) {
      throw toFuseError(err);
    }
  }

  private async engineAsync<T>(call: () => Promise<T>): Promise<T> {
    try {
      return await call();
    } catch (err) {
      throw toFuseError(err);
    }
  }

  lookup(parent: number, name: string): LookupResult {
    if (parent !== FUSE_ROOT_ID) throw new FuseError(Errno.ENOTDIR);
    if (Buffer.byteLength(name) > 255) throw new FuseError(Errno.ENAMETOOLONG);
    const node = this.byName.get(name);
    if (!node) throw new FuseError(Errno.ENOENT);
    const attr = this.fileAttr(node);
    node.lookups++;
    return { nodeid: node.nodeid, attr };
  }

  forget(nodeid: number, nlookup: number): void {
    const node = this.byNode.get(nodeid);
    if (!node) return;
    node.lookups = Math.max(0, node.lookups - nlookup);
    this.maybeDrop(node);
  }

  getattr(nodeid: number): Attr {
    return nodeid === FUSE_ROOT_ID ? this.rootAttr() : this.fileAttr(this.node(nodeid));
  }

  async setattr(nodeid: number, changes: AttrChanges): Promise<Attr> {
    if (nodeid === FUSE_ROOT_ID) {
      if (changes.size !== undefined) throw new FuseError(Errno.EISDIR);
      if (changes.mode !== undefined || changes.uid !== undefined || changes.gid !== undefined)
        throw new FuseError(Errno.EPERM);
      return this.rootAttr();
    }
    const node = this.node(nodeid);
    // Ownership and mode are fixed: the files are root's plumbing, not user data.
    if (changes.mode !== undefined || changes.uid !== undefined || changes.gid !== undefined)
      throw new FuseError(Errno.EPERM);
    if (changes.size !== undefined) {
      const current = this.engine(() => this.store.getVolume(node.volumeId));
      // The file is the volume: shrinking would cut data off (and O_TRUNC would wipe it), so only growth
      // is accepted, and only to a whole number of blocks, which is what the store can address.
      if (changes.size < current.capacityBytes) throw new FuseError(Errno.EINVAL, 'volume files cannot shrink');
      if (changes.size > current.capacityBytes) {
        await this.engineAsync(() => this.store.growVolume(node.volumeId, changes.size as number));
      }
    }
    // Time changes are accepted and not kept: a file's times are its volume's creation time.
    return this.fileAttr(node);
  }

  open(nodeid: number, flags: number): OpenResult {
    if (nodeid === FUSE_ROOT_ID) throw new FuseError(Errno.EISDIR);
    const node = this.node(nodeid);
    if (node.removed) throw new FuseError(Errno.ENOENT);
    if (flags & fsConstants.O_TRUNC) throw new FuseError(Errno.EINVAL, 'volume files cannot be truncated');
    const fh = this.nextHandle++;
    this.handles.set(fh, node);
    node.openHandles.add(fh);
    this.directIo?.opened(fh, nodeid, node.volumeId);
    return { fh, openFlags: OpenOutFlag.DIRECT_IO | OpenOutFlag.PARALLEL_DIRECT_WRITES };
  }

  read(nodeid: number, fh: number, offset: number, size: number): Buffer {
    const node = this.handle(nodeid, fh);
    const capacity = this.engine(() => this.store.getVolume(node.volumeId)).capacityBytes;
    if (offset >= capacity || size === 0) return Buffer.alloc(0);
    const length = Math.min(size, capacity - offset);
    const data = this.engine(() => this.store.read(node.volumeId, offset, length));
    this.directIo?.servedOnMain(node.volumeId);
    return data;
  }

  write(nodeid: number, fh: number, offset: number, data: Buffer): number {
    const node = this.handle(nodeid, fh);
    const capacity = this.engine(() => this.store.getVolume(node.volumeId)).capacityBytes;
    if (data.length === 0) return 0;
    // A volume file never grows by writing: at the end it is full, like a block device.
    if (offset >= capacity) throw new FuseError(Errno.ENOSPC);
    const length = Math.min(data.length, capacity - offset);
    this.engine(() => this.store.write(node.volumeId, offset, data.subarray(0, length)));
    this.directIo?.servedOnMain(node.volumeId);
    return length;
  }

  async flush(nodeid: number, fh: number): Promise<void> {
    // close(2) does not promise durability; fsync does. Writes are already in the store when answered.
    this.handle(nodeid, fh);
  }

  async fsync(nodeid: number, fh: number, _datasync: boolean): Promise<void> {
    const node = this.handle(nodeid, fh);
    // Data and metadata are one thing here (the size only changes through growVolume, which is durable
    // on return), so fdatasync and fsync both mean: flush the volume.
    await this.engineAsync(() => this.store.flush(node.volumeId));
  }

  async fallocate(nodeid: number, fh: number, mode: number, offset: number, length: number): Promise<void> {
    const node = this.handle(nodeid, fh);
    const capacity = this.engine(() => this.store.getVolume(node.volumeId)).capacityBytes;
    const keepSize = (mode & FallocMode.KEEP_SIZE) !== 0;
    const punch = (mode & FallocMode.PUNCH_HOLE) !== 0;
    const zero = (mode & FallocMode.ZERO_RANGE) !== 0;
    const known = FallocMode.KEEP_SIZE | FallocMode.PUNCH_HOLE | FallocMode.ZERO_RANGE;
    if (mode & ~known || (punch && zero) || (!punch && !zero)) {
      // Plain preallocation cannot be promised by a thin store, and the other modes move data around.
      throw new FuseError(Errno.EOPNOTSUPP);
    }
    if (length === 0) throw new FuseError(Errno.EINVAL);
    const end = offset + length;
    if (end > capacity && !keepSize) throw new FuseError(Errno.EFBIG, 'volume files cannot grow by fallocate');
    const clippedEnd = Math.min(end, capacity);
    if (offset >= clippedEnd) return;
    // Both a punched hole and a zeroed range read as zeros afterwards; a trim gives exactly that and lets
    // the store drop the blocks, and it is recorded as a change for CBT either way.
    this.engine(() => this.store.trim(node.volumeId, offset, clippedEnd - offset));
  }

  release(nodeid: number, fh: number): void {
    const node = this.handles.get(fh);
    if (!node || node.nodeid !== nodeid) return;
    this.handles.delete(fh);
    node.openHandles.delete(fh);
    this.directIo?.released(fh);
    this.maybeDrop(node);
  }

  opendir(nodeid: number): number {
    if (nodeid !== FUSE_ROOT_ID) throw new FuseError(Errno.ENOTDIR);
    const entries: Dirent[] = [];
    const push = (ino: number, type: number, name: string): void => {
      entries.push({ ino, type, name, nextOffset: entries.length + 1 });
    };
    push(FUSE_ROOT_ID, DT_DIR, '.');
    push(FUSE_ROOT_ID, DT_DIR, '..');
    for (const n of this.byName.values()) push(n.nodeid, DT_REG, n.name);
    const fh = this.nextHandle++;
    this.dirHandles.set(fh, entries);
    return fh;
  }

  readdir(nodeid: number, fh: number, offset: number): Dirent[] {
    if (nodeid !== FUSE_ROOT_ID) throw new FuseError(Errno.ENOTDIR);
    const entries = this.dirHandles.get(fh);
    if (!entries) throw new FuseError(Errno.EBADF);
    return entries.slice(offset);
  }

  releasedir(_nodeid: number, fh: number): void {
    this.dirHandles.delete(fh);
  }

  statfs(_nodeid: number): Statfs {
    let bytes = 0;
    for (const n of this.byName.values()) {
      try {
        bytes += this.store.getVolume(n.volumeId).capacityBytes;
      } catch {
        // A volume deleted behind our back contributes nothing.
      }
    }
    // Nothing can be allocated in this directory by users, so it reports itself full.
    return {
      blocks: Math.ceil(bytes / STATFS_BLOCK),
      bfree: 0,
      bavail: 0,
      files: this.byName.size,
      ffree: 0,
      bsize: STATFS_BLOCK,
      namelen: 255,
      frsize: STATFS_BLOCK,
    };
  }

  access(nodeid: number, mask: number, uid: number): void {
    if (nodeid !== FUSE_ROOT_ID) this.node(nodeid);
    // Only root may touch the files (mode 0600 root:root); the directory is readable by everyone.
    if (uid === 0 || mask === fsConstants.F_OK) return;
    if (nodeid === FUSE_ROOT_ID && (mask & fsConstants.W_OK) === 0) return;
    throw new FuseError(Errno.EACCES);
  }
}

/** Engine error codes to errnos, in one place. */
export function toFuseError(err: unknown): unknown {
  if (err instanceof FuseError || !(err instanceof EngineError)) return err;
  switch (err.code) {
    case 'NOT_FOUND':
      return new FuseError(Errno.ENOENT, err.message);
    case 'INVALID_ARGUMENT':
      return new FuseError(Errno.EINVAL, err.message);
    case 'OUT_OF_RANGE':
      return new FuseError(Errno.EFBIG, err.message);
    case 'NO_SPACE':
      return new FuseError(Errno.ENOSPC, err.message);
    case 'BUSY':
      return new FuseError(Errno.EBUSY, err.message);
    default:
      return new FuseError(Errno.EIO, err.message);
  }
}
