/**
 * The FUSE server: decodes kernel requests, calls the file system, encodes replies (FuseDispatcher), and
 * owns the life of one mount (FuseServer): clean a stale mount, open the device, mount, answer INIT,
 * serve, unmount.
 *
 * Requests are read by the device's I/O threads (io-threads.ts). READ and WRITE of files with a direct I/O
 * session are answered there; everything else comes to the dispatcher on the main thread, in arrival order.
 * Synchronous handlers (READ, WRITE, LOOKUP…) complete before the next request is looked at; asynchronous
 * ones (FSYNC, SETATTR size) let later requests proceed while they wait, as the kernel allows for any request
 * it has not answered yet.
 */
import os from 'node:os';
import path from 'node:path';
import { FuseDevice } from './device.js';
import { FuseError, type FuseFilesystem, type FuseNotifier, type NotifyingFilesystem } from './filesystem.js';
import type { IoThreadLink } from './io-threads.js';
import {
  abortFuseConnection,
  cleanStaleFuseMounts,
  fuseMountsAt,
  mountFuse,
  unmount,
  type MountInfoEntry,
} from './mount.js';
import {
  decodeAccessIn,
  decodeBatchForgetIn,
  decodeFallocateIn,
  decodeFh,
  decodeForgetIn,
  decodeFsyncIn,
  decodeInHeader,
  decodeInitIn,
  decodeName,
  decodeOpenIn,
  decodeReadIn,
  decodeSetattrIn,
  decodeWriteIn,
  encodeAttrOut,
  encodeDirents,
  encodeEntryOut,
  encodeInitOut,
  encodeNotifyInvalEntry,
  encodeNotifyInvalInode,
  encodeOpenOut,
  encodeOutHeader,
  encodeStatfsOut,
  encodeWriteOut,
  Errno,
  FUSE_KERNEL_MINOR_VERSION,
  FUSE_KERNEL_VERSION,
  IN_HEADER_SIZE,
  InitFlag,
  opcodeName,
  Opcode,
  SetattrValid,
  type InHeader,
  type InitOut,
} from './protocol.js';
import type { AttrChanges } from './filesystem.js';

/** The subset of a pino logger the server uses. */
export interface FuseLogger {
  debug(obj: object, msg: string): void;
  info(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
}

const silentLogger: FuseLogger = { debug() {}, info() {}, warn() {} };

export interface DispatcherOptions {
  /** Largest WRITE payload we accept; 1 MiB needs the kernel's MAX_PAGES (256 pages of 4 KiB). */
  maxWrite: number;
  /** How long the kernel may cache names and attributes, in seconds. */
  entryValidSec: number;
  attrValidSec: number;
  logger: FuseLogger;
  /** Admission before a request is handled: a promise holds it until it settles (I/O limits, io-limiter.ts). */
  admit?: (header: InHeader, body: Buffer) => Promise<void> | undefined;
}

const DEFAULT_DISPATCHER_OPTIONS: DispatcherOptions = {
  maxWrite: 1024 * 1024,
  entryValidSec: 1,
  attrValidSec: 1,
  logger: silentLogger,
};

/** INIT capabilities we ask for; the reply carries the intersection with what the kernel offers. */
const WANTED_INIT_FLAGS =
  // Several READs in flight at once (the loop device and readahead issue them in parallel).
  InitFlag.ASYNC_READ |
  // WRITEs larger than one page.
  InitFlag.BIG_WRITES |
  // Honour max_pages, so one request can carry max_write bytes.
  InitFlag.MAX_PAGES |
  // Asynchronous direct I/O: the loop device's aio is split into concurrent requests instead of one at a time.
  InitFlag.ASYNC_DIO |
  InitFlag.PARALLEL_DIROPS;

const PAGE_SIZE = 4096;

/** Names of namespace-changing opcodes: the directory is managed by the server's owner, never by users. */
const NAMESPACE_CHANGES = new Set<number>([
  Opcode.SYMLINK,
  Opcode.MKNOD,
  Opcode.MKDIR,
  Opcode.UNLINK,
  Opcode.RMDIR,
  Opcode.RENAME,
  Opcode.RENAME2,
  Opcode.LINK,
  Opcode.CREATE,
  Opcode.TMPFILE,
]);

/** Counters for metrics and tests. */
export interface FuseStats {
  requests: number;
  errors: number;
  bytesRead: number;
  bytesWritten: number;
}

/** Writes one reply or notification as one message. */
export type ReplySink = (parts: Buffer[]) => void;

/**
 * Protocol logic, independent of the device: give it a raw request, it calls the file system and hands
 * the encoded reply (if the opcode has one) to `send`.
 */
export class FuseDispatcher {
  private readonly options: DispatcherOptions;
  private negotiated: InitOut | undefined;
  private destroyed = false;
  private resolveInit!: (init: InitOut) => void;
  private rejectInit!: (err: Error) => void;
  /** Settles once INIT has been answered (or refused). */
  readonly initialized: Promise<InitOut>;
  readonly stats: FuseStats = { requests: 0, errors: 0, bytesRead: 0, bytesWritten: 0 };

  constructor(
    private readonly fs: FuseFilesystem,
    options: Partial<DispatcherOptions> = {},
  ) {
    this.options = { ...DEFAULT_DISPATCHER_OPTIONS, ...options };
    if (this.options.maxWrite < 128 * 1024 || this.options.maxWrite % PAGE_SIZE !== 0) {
      throw new RangeError('maxWrite must be a multiple of 4 KiB and at least 128 KiB');
    }
    this.initialized = new Promise<InitOut>((resolve, reject) => {
      this.resolveInit = resolve;
      this.rejectInit = reject;
    });
    // A refusal is reported through `initialized`; nobody may be listening yet.
    this.initialized.catch(() => undefined);
  }

  /** Bytes a device read buffer needs: the largest WRITE plus its headers, with room to spare. */
  get readBufferSize(): number {
    return this.options.maxWrite + PAGE_SIZE;
  }

  get init(): InitOut | undefined {
    return this.negotiated;
  }

  /** Handles one request. Resolves when the reply (if any) has been handed to `send`. Never rejects. */
  async dispatch(request: Buffer, send: ReplySink): Promise<void> {
    let header: InHeader;
    try {
      header = decodeInHeader(request);
    } catch (err) {
      this.options.logger.warn({ err }, 'unparseable FUSE request dropped');
      return;
    }
    this.stats.requests++;
    const body = request.subarray(IN_HEADER_SIZE, Math.min(header.len, request.length));
    const admitted = this.options.admit?.(header, body);
    if (admitted) await admitted;
    const reply = (payload?: Buffer): void => {
      send(
        payload ? [encodeOutHeader(payload.length, 0, header.unique), payload] : [encodeOutHeader(0, 0, header.unique)],
      );
    };
    try {
      await this.handle(header, body, reply);
    } catch (err) {
      this.stats.errors++;
      let errno: number;
      if (err instanceof FuseError) {
        errno = err.errno;
        this.options.logger.debug({ opcode: opcodeName(header.opcode), nodeid: header.nodeid, errno }, err.message);
      } else {
        errno = Errno.EIO;
        this.options.logger.warn(
          { err, opcode: opcodeName(header.opcode), nodeid: header.nodeid },
          'FUSE request failed',
        );
      }
      if (header.opcode === Opcode.INIT) this.rejectInit(err instanceof Error ? err : new Error(String(err)));
      if (!hasNoReply(header.opcode)) send([encodeOutHeader(0, -errno, header.unique)]);
    }
  }

  private async handle(h: InHeader, body: Buffer, reply: (payload?: Buffer) => void): Promise<void> {
    const fs = this.fs;
    const o = this.options;
    if (h.opcode !== Opcode.INIT && !this.negotiated) throw new FuseError(Errno.EIO, 'request before INIT');
    switch (h.opcode) {
      case Opcode.INIT:
        return reply(this.negotiate(body));
      case Opcode.DESTROY:
        this.destroyed = true;
        return reply();
      case Opcode.LOOKUP: {
        const found = fs.lookup(h.nodeid, decodeName(body));
        return reply(
          encodeEntryOut({
            nodeid: found.nodeid,
            generation: 0,
            entryValidSec: o.entryValidSec,
            attrValidSec: o.attrValidSec,
            attr: found.attr,
          }),
        );
      }
      case Opcode.FORGET:
        fs.forget(h.nodeid, decodeForgetIn(body));
        return;
      case Opcode.BATCH_FORGET:
        for (const f of decodeBatchForgetIn(body)) fs.forget(f.nodeid, f.nlookup);
        return;
      case Opcode.GETATTR:
        return reply(encodeAttrOut(fs.getattr(h.nodeid), o.attrValidSec));
      case Opcode.SETATTR: {
        const s = decodeSetattrIn(body);
        const changes: AttrChanges = {};
        if (s.valid & SetattrValid.SIZE) changes.size = s.size;
        if (s.valid & SetattrValid.MODE) changes.mode = s.mode;
        if (s.valid & SetattrValid.UID) changes.uid = s.uid;
        if (s.valid & SetattrValid.GID) changes.gid = s.gid;
        const timeBits =
          SetattrValid.ATIME |
          SetattrValid.MTIME |
          SetattrValid.ATIME_NOW |
          SetattrValid.MTIME_NOW |
          SetattrValid.CTIME;
        if (s.valid & timeBits) changes.times = true;
        return reply(encodeAttrOut(await fs.setattr(h.nodeid, changes), o.attrValidSec));
      }
      case Opcode.OPEN: {
        const opened = fs.open(h.nodeid, decodeOpenIn(body).flags);
        return reply(encodeOpenOut(opened.fh, opened.openFlags));
      }
      case Opcode.READ: {
        const r = decodeReadIn(body);
        const data = fs.read(h.nodeid, r.fh, r.offset, Math.min(r.size, o.maxWrite));
        this.stats.bytesRead += data.length;
        return reply(data);
      }
      case Opcode.WRITE: {
        const w = decodeWriteIn(body);
        const n = fs.write(h.nodeid, w.fh, w.offset, w.data);
        this.stats.bytesWritten += n;
        return reply(encodeWriteOut(n));
      }
      case Opcode.FLUSH:
        await fs.flush(h.nodeid, decodeFh(body, 'FLUSH'));
        return reply();
      case Opcode.FSYNC: {
        const f = decodeFsyncIn(body);
        await fs.fsync(h.nodeid, f.fh, f.datasync);
        return reply();
      }
      case Opcode.FALLOCATE: {
        const f = decodeFallocateIn(body);
        await fs.fallocate(h.nodeid, f.fh, f.mode, f.offset, f.length);
        return reply();
      }
      case Opcode.RELEASE:
        fs.release(h.nodeid, decodeFh(body, 'RELEASE'));
        return reply();
      case Opcode.OPENDIR:
        return reply(encodeOpenOut(fs.opendir(h.nodeid), 0));
      case Opcode.READDIR: {
        const r = decodeReadIn(body);
        return reply(encodeDirents(fs.readdir(h.nodeid, r.fh, r.offset), r.size));
      }
      case Opcode.RELEASEDIR:
        fs.releasedir(h.nodeid, decodeFh(body, 'RELEASEDIR'));
        return reply();
      case Opcode.FSYNCDIR:
        // Directory entries are the owner's in-memory state; there is nothing to make durable.
        return reply();
      case Opcode.STATFS:
        return reply(encodeStatfsOut(fs.statfs(h.nodeid)));
      case Opcode.ACCESS:
        fs.access(h.nodeid, decodeAccessIn(body).mask, h.uid);
        return reply();
      case Opcode.INTERRUPT:
        // Every handler here finishes on its own in bounded time, so the interrupted request is simply
        // answered normally; an INTERRUPT itself gets no reply.
        return;
      default:
        if (NAMESPACE_CHANGES.has(h.opcode)) throw new FuseError(Errno.EPERM);
        throw new FuseError(Errno.ENOSYS);
    }
  }

  private negotiate(body: Buffer): Buffer {
    const kernel = decodeInitIn(body);
    if (kernel.major !== FUSE_KERNEL_VERSION) {
      throw new FuseError(Errno.EPROTO, `kernel speaks FUSE ${kernel.major}.${kernel.minor}; only 7.x is supported`);
    }
    const maxPages = Math.ceil(this.options.maxWrite / PAGE_SIZE);
    const init: InitOut = {
      major: FUSE_KERNEL_VERSION,
      minor: Math.min(kernel.minor, FUSE_KERNEL_MINOR_VERSION),
      maxReadahead: kernel.maxReadahead,
      flags: (kernel.flags & WANTED_INIT_FLAGS) >>> 0,
      // Asynchronous direct I/O from loop devices travels as background requests; every loop device of the
      // node shares this one connection, so room for several devices' queues (iodepth 32 each, 1 MiB writes
      // split in two by the loop device) keeps them from waiting on each other.
      maxBackground: 256,
      congestionThreshold: 192,
      maxWrite: this.options.maxWrite,
      timeGran: 1,
      maxPages,
    };
    this.negotiated = init;
    this.options.logger.info(
      { kernel: `${kernel.major}.${kernel.minor}`, minor: init.minor, flags: init.flags, maxWrite: init.maxWrite },
      'FUSE connection initialised',
    );
    this.resolveInit(init);
    return encodeInitOut(init);
  }

  get isDestroyed(): boolean {
    return this.destroyed;
  }
}

function hasNoReply(opcode: number): boolean {
  return opcode === Opcode.FORGET || opcode === Opcode.BATCH_FORGET || opcode === Opcode.INTERRUPT;
}

// ------------------------------------------------------------------ the mount

export interface FuseServerOptions extends Partial<DispatcherOptions> {
  /** Source name shown in mountinfo. Default "cbt-csi". */
  source?: string;
  /** Default true: kubelet and pods are not the mounting process. */
  allowOther?: boolean;
  /** Default true: the kernel checks mode bits itself, so ACCESS never has to be answered. */
  defaultPermissions?: boolean;
  /** How long to wait for the kernel's INIT after mounting. Default 10 s. */
  initTimeoutMs?: number;
  /** Threads reading /dev/fuse (and serving direct I/O). Default: the CPU count, at least 4, at most 8. */
  ioThreads?: number;
}

/** A file system whose files the I/O threads may serve themselves (volume-files.ts). */
export interface DirectIoFilesystem extends FuseFilesystem {
  attachIoThreads(threads: IoThreadLink | undefined, logger: FuseLogger): void;
}

/**
 * At least 4 even on 2 cores: a thread waiting for the disk (an O_DIRECT read of the head, a cache miss)
 * uses no CPU, and each one more keeps one more request in flight (sequential reads through the device went
 * from 0.87 to 1.07 of a plain file on 2 cores, docs/benchmarks.md).
 */
function defaultIoThreads(): number {
  return Math.min(8, Math.max(4, os.availableParallelism()));
}

/** How long the I/O threads may take to load (seconds under tsx on a loaded machine; milliseconds compiled). */
const THREADS_START_MS = 60_000;

/** Mount points this process serves, so a second mount here is refused instead of unmounting a live one. */
const servedHere = new Set<string>();

function timeout(ms: number, what: string): { promise: Promise<never>; cancel: () => void } {
  let timer: NodeJS.Timeout | undefined;
  const promise = new Promise<never>((_r, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} timed out after ${ms} ms`)), ms);
  });
  promise.catch(() => undefined);
  return { promise, cancel: () => clearTimeout(timer) };
}

export class FuseServer {
  private closing: Promise<void> | undefined;
  private endError: Error | undefined;
  private ended = false;
  private mountEntry: MountInfoEntry | undefined;
  private threads: IoThreadLink | undefined;

  private constructor(
    readonly mountPoint: string,
    private readonly device: FuseDevice,
    readonly dispatcher: FuseDispatcher,
    private readonly fs: FuseFilesystem,
    private readonly logger: FuseLogger,
    private readonly ioThreads: number,
  ) {}

  /**
   * Mounts `fs` at `mountPoint` (an existing directory). A FUSE mount already there that this process
   * does not serve is taken to be left by an earlier, dead instance and is lazily unmounted first.
   */
  static async mount(mountPoint: string, fs: FuseFilesystem, options: FuseServerOptions = {}): Promise<FuseServer> {
    const mp = path.resolve(mountPoint);
    if (servedHere.has(mp)) throw new Error(`${mp} is already served by this process`);
    servedHere.add(mp);
    const logger = options.logger ?? silentLogger;
    let device: FuseDevice | undefined;
    let mounted = false;
    try {
      const stale = await cleanStaleFuseMounts(mp);
      if (stale > 0) logger.warn({ mountPoint: mp, stale }, 'removed stale FUSE mounts');
      const dispatcher = new FuseDispatcher(fs, options);
      device = FuseDevice.open();
      const server = new FuseServer(mp, device, dispatcher, fs, logger, options.ioThreads ?? defaultIoThreads());
      // The threads load before the mount, so the kernel's INIT finds a reader at once.
      const booting = timeout(THREADS_START_MS, 'starting the FUSE I/O threads');
      try {
        await Promise.race([server.startThreads(), booting.promise]);
      } finally {
        booting.cancel();
      }
      await mountFuse(device.fd, mp, {
        source: options.source ?? 'cbt-csi',
        allowOther: options.allowOther ?? true,
        defaultPermissions: options.defaultPermissions ?? true,
      });
      mounted = true;
      server.mountEntry = fuseMountsAt(mp).at(-1);
      server.serve();
      const limit = timeout(options.initTimeoutMs ?? 10_000, 'FUSE INIT');
      try {
        await Promise.race([dispatcher.initialized, limit.promise]);
      } finally {
        limit.cancel();
      }
      return server;
    } catch (err) {
      // Note the connection's device number before the mount disappears: aborting needs it.
      const entry = mounted ? fuseMountsAt(mp).at(-1) : undefined;
      if (mounted) await unmount(mp, true).catch(() => undefined);
      if (device) {
        if (device.reading && entry) await abortFuseConnection(entry.device).catch(() => undefined);
        device.stopUnread();
        await device.whenReaderStopped();
        device.close();
      }
      servedHere.delete(mp);
      throw err;
    }
  }

  private async startThreads(): Promise<void> {
    const d = this.device;
    const send: ReplySink = (parts) => {
      try {
        d.writeMessage(parts);
      } catch (err) {
        // ENOENT: the request was interrupted and the kernel no longer waits for it. ENODEV: unmounted.
        const code = (err as NodeJS.ErrnoException).code;
        if (code !== 'ENOENT' && code !== 'ENODEV') this.logger.warn({ err }, 'writing a FUSE reply failed');
      }
    };
    this.threads = await d.startThreads(this.dispatcher.readBufferSize, this.ioThreads, {
      onRequest: (request, done) => {
        void this.dispatcher.dispatch(request, send).finally(done);
      },
      onEnd: (err) => {
        this.ended = true;
        this.endError = err;
        if (err) this.logger.warn({ err, mountPoint: this.mountPoint }, 'FUSE device reader stopped');
        else if (!this.closing)
          this.logger.warn({ mountPoint: this.mountPoint }, 'FUSE connection ended (unmounted from outside?)');
      },
    });
  }

  /** The device is mounted: the threads read it, and the file system may serve files through them. */
  private serve(): void {
    this.device.startReading();
    if (isNotifying(this.fs)) this.fs.attachNotifier(this.notifier());
    if (isDirectIo(this.fs)) this.fs.attachIoThreads(this.threads, this.logger);
  }

  private notifier(): FuseNotifier {
    const write = async (msg: Buffer): Promise<void> => {
      if (this.ended || this.closing) return;
      try {
        await this.device.writeNotification(msg);
      } catch (err) {
        // ENOENT: the kernel had nothing cached under that name or node, which is what we wanted.
        const code = (err as NodeJS.ErrnoException).code;
        if (code !== 'ENOENT' && code !== 'ENODEV') throw err;
      }
    };
    return {
      invalidateInode: (nodeid) => write(encodeNotifyInvalInode(nodeid)),
      invalidateEntry: (parent, name) => write(encodeNotifyInvalEntry(parent, name)),
    };
  }

  /** True while the kernel connection is alive. */
  get connected(): boolean {
    return !this.ended;
  }

  /** Requests read, failed, and bytes moved, by the I/O threads and the main thread together. */
  get stats(): FuseStats {
    const main = this.dispatcher.stats;
    const threads = this.device.threadStats();
    return {
      requests: threads.requests,
      errors: main.errors,
      bytesRead: main.bytesRead + threads.bytesRead,
      bytesWritten: main.bytesWritten + threads.bytesWritten,
    };
  }

  /** Requests the I/O threads answered themselves (direct reads and writes). */
  get directRequests(): number {
    return this.device.threadStats().direct;
  }

  /**
   * Unmounts and closes. A plain umount ends the connection; if something still holds a file open (a
   * loop device), the mount is detached lazily and the connection aborted, so that the process is not
   * left with a reader it cannot stop. Idempotent.
   */
  close(): Promise<void> {
    this.closing ??= this.doClose();
    return this.closing;
  }

  private async doClose(): Promise<void> {
    if (isNotifying(this.fs)) this.fs.attachNotifier(undefined);
    // Direct writes are recorded in the engine before the connection goes; requests go to the main thread.
    if (isDirectIo(this.fs)) this.fs.attachIoThreads(undefined, this.logger);
    try {
      if (!this.ended) {
        let graceMs = 5000;
        try {
          await unmount(this.mountPoint, false);
        } catch (err) {
          this.logger.warn(
            { err, mountPoint: this.mountPoint },
            'umount failed; detaching lazily and aborting the connection',
          );
          await unmount(this.mountPoint, true).catch(() => undefined);
          // A lazy unmount only ends the connection if nothing holds a file; give that a moment, no more.
          graceMs = 250;
        }
        const grace = timeout(graceMs, 'reader stop');
        const stopped = await Promise.race([
          this.device.whenReaderStopped().then(() => true),
          grace.promise.catch(() => false),
        ]);
        grace.cancel();
        if (!stopped && this.mountEntry) {
          await abortFuseConnection(this.mountEntry.device);
        }
      } else if (fuseMountsAt(this.mountPoint).some((m) => m.device === this.mountEntry?.device)) {
        // The connection died under us (aborted from outside) but the mount is still there: remove it.
        await unmount(this.mountPoint, true).catch(() => undefined);
      }
      await this.device.whenReaderStopped();
      this.device.close();
    } finally {
      servedHere.delete(this.mountPoint);
    }
    if (this.endError) this.logger.warn({ err: this.endError }, 'FUSE reader had failed before close');
  }
}

function isDirectIo(fs: FuseFilesystem): fs is DirectIoFilesystem {
  return typeof (fs as Partial<DirectIoFilesystem>).attachIoThreads === 'function';
}

function isNotifying(fs: FuseFilesystem): fs is NotifyingFilesystem {
  return typeof (fs as Partial<NotifyingFilesystem>).attachNotifier === 'function';
}
