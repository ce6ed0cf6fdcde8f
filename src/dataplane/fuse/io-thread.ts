/**
 * One I/O thread of the FUSE device (a worker; io-threads.ts starts several, all reading the same /dev/fuse
 * descriptor, which the kernel allows: each request goes to one reader). A thread answers READ and WRITE of
 * files with a direct I/O session itself (see storage-engine/direct-io.ts and direct-log.ts) and hands every
 * other request to the main thread, which owns the engine.
 *
 * - READ: the thread applies the session's log to its copy of the chain's location index, then reads each
 *   stretch from the owning layer's file (its own read-only descriptor) straight into the reply. Large
 *   stretches of the head are read with O_DIRECT (see readStretch).
 * - WRITE of whole blocks inside the volume: inside the session's gate, one pwrite into the head's file, then
 *   a log entry, then the reply. Partial blocks, writes past the end and anything that fails go to the main
 *   thread, which does them through the engine.
 *
 * The thread blocks in read(2) between requests, so it runs no event loop: messages from the main thread
 * are picked up synchronously (receiveMessageOnPort) when a shared counter says there are some.
 */
import fs from 'node:fs';
import { type MessagePort, parentPort, receiveMessageOnPort, workerData } from 'node:worker_threads';
import { readLayerBytes } from '../../../storage-engine/layer-bytes.js';
import { LocationIndex } from '../../../storage-engine/location-index.js';
import { DIRECT_ALIGN, pageAlignedMemory } from '../../aligned-memory.js';
import { DirectLog, SessionState } from './direct-log.js';
import { IN_HEADER_SIZE, Opcode, OUT_HEADER_SIZE, WRITE_IN_SIZE, WRITE_OUT_SIZE } from './protocol.js';

/** A session's view as the main thread shares it (typed arrays over shared memory). */
export interface SharedView {
  blockSize: number;
  capacityBytes: number;
  headId: number;
  layerPaths: Array<[number, string]>;
  starts: Float64Array;
  ends: Float64Array;
  owners: Int32Array;
  /** Runs of blocks whose writes go to the main thread (the engine must see them first; see direct-io.ts). */
  engineWriteStarts: Float64Array;
  engineWriteEnds: Float64Array;
  /** The log position the view is exact at: entries from here on are not in it. */
  position: number;
}

/** Messages from the main thread. */
export type ToIoThread =
  | { t: 'session'; volumeId: string; id: number; log: SharedArrayBuffer; view: SharedView }
  | { t: 'view'; volumeId: string; id: number; view: SharedView }
  | { t: 'end'; volumeId: string; id: number }
  | { t: 'handle'; fh: number; nodeid: number; volumeId: string }
  | { t: 'release'; fh: number };

/** Messages to the main thread. */
export type FromIoThread =
  | { kind: 'request'; buffer: ArrayBuffer; length: number }
  | { kind: 'drain'; volumeId: string; id: number }
  | { kind: 'resync'; volumeId: string; id: number; thread: number }
  | { kind: 'ready' }
  | { kind: 'end' }
  | { kind: 'error'; code: string; message: string };

export interface IoThreadData {
  /** This thread's number (index into the stats and the main thread's ports). */
  thread: number;
  fd: number;
  bufferSize: number;
  /** Request buffers the main thread is done with come back here. */
  returnPort: MessagePort;
  /** ToIoThread messages. */
  controlPort: MessagePort;
  /**
   * Int32 [0]: bumped after every control message, so the thread knows to look. [1]: 0 until the device is
   * mounted (reads would fail before), then 1 to start reading, or -1 to exit without reading.
   */
  control: SharedArrayBuffer;
  /** Float64 per thread: see Stat. */
  stats: SharedArrayBuffer;
  maxPooled: number;
}

/** Slots of a thread's stats. */
export const Stat = { requests: 0, direct: 1, bytesRead: 2, bytesWritten: 3 } as const;
export const STATS_PER_THREAD = 4;

/** How long a direct write waits for room in the log before handing the request to the main thread. */
const ROOM_WAIT_MS = 5000;
/** How long a read waits for a log entry being published before handing the request to the main thread. */
const ENTRY_WAIT_MS = 1000;
/**
 * Stretches of the head at least this long are read with O_DIRECT, bypassing the page cache. Buffered, a
 * sequential read makes the kernel's readahead fill the cache with large folios (up to 2 MiB), and every
 * later 4 KiB write into one of them costs ~100 µs of ext4 time instead of ~10 (docs/benchmarks.md, "Why
 * random writes were slow"). Only the head is written, so only its reads bypass the cache; frozen layers
 * keep their cached, read-ahead reads. Short reads stay buffered: they make small folios.
 */
const DIRECT_READ_MIN = 64 * 1024;

/** A request buffer and its views (rebuilt when the buffer comes back from the main thread). */
interface RequestBuffer {
  bytes: Uint8Array;
  view: DataView;
}

function requestBuffer(buffer: ArrayBuffer): RequestBuffer {
  return { bytes: new Uint8Array(buffer), view: new DataView(buffer) };
}

interface LayerFile {
  id: number;
  path: string;
  fd: number | undefined;
  /** Opened with O_DIRECT for large reads of the head; null where the filesystem refuses O_DIRECT. */
  directFd: number | null | undefined;
}

interface Session {
  id: number;
  volumeId: string;
  log: DirectLog;
  blockSize: number;
  capacityBytes: number;
  head: LayerFile;
  headWriteFd: number | undefined;
  layers: Map<number, LayerFile>;
  /** Built on the first read, from `view`. */
  index: LocationIndex<LayerFile> | undefined;
  view: SharedView | undefined;
  /** Next log entry to apply to `index`. */
  position: number;
  /** A resync was asked for; reads go to the main thread until the new view arrives. */
  awaitingView: boolean;
  /** See SharedView.engineWriteStarts. */
  engineWriteStarts: Float64Array;
  engineWriteEnds: Float64Array;
}

/** Whether blocks [first, end) meet one of the sorted, disjoint runs [starts[i], ends[i]). */
function overlapsRuns(starts: Float64Array, ends: Float64Array, first: number, end: number): boolean {
  // The last run starting before `end` is the only one that can reach into the range.
  let lo = 0;
  let hi = starts.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (starts[mid]! < end) lo = mid + 1;
    else hi = mid;
  }
  return lo > 0 && ends[lo - 1]! > first;
}

function closeLayer(layer: LayerFile): void {
  if (layer.fd !== undefined) fs.closeSync(layer.fd);
  if (typeof layer.directFd === 'number') fs.closeSync(layer.directFd);
  layer.fd = undefined;
  layer.directFd = undefined;
}

function closeFiles(s: Session): void {
  for (const layer of s.layers.values()) closeLayer(layer);
  if (s.headWriteFd !== undefined) fs.closeSync(s.headWriteFd);
  s.headWriteFd = undefined;
}

function layerFiles(view: SharedView): Map<number, LayerFile> {
  return new Map(view.layerPaths.map(([id, path]) => [id, { id, path, fd: undefined, directFd: undefined }]));
}

/** The low 53 bits of a little-endian u64 (offsets, handles and node ids all stay below 2^53). */
function u64(view: DataView, at: number): number {
  return view.getUint32(at, true) + view.getUint32(at + 4, true) * 2 ** 32;
}

class IoThread {
  private readonly sessions = new Map<string, Session>();
  private readonly handles = new Map<number, { nodeid: number; volumeId: string }>();
  private readonly control: Int32Array;
  private readonly stats: Float64Array;
  private seenGeneration = 0;
  /** Request buffers handed to the main thread and not back yet: only then is the return port worth a look. */
  private lent = 0;
  /** Request buffers with their views, so a request costs no allocation. */
  private readonly pool: RequestBuffer[] = [];
  /**
   * Header and payload of READ replies, reused: a reply is written before the next request is read. Cut from
   * page-aligned memory so that the payload starts on a page boundary, where O_DIRECT can read into it.
   */
  private readonly readReply: Buffer;
  private readonly replyAligned: boolean;
  private readonly writeReply = Buffer.alloc(OUT_HEADER_SIZE + WRITE_OUT_SIZE);

  constructor(private readonly d: IoThreadData) {
    this.control = new Int32Array(d.control);
    this.stats = new Float64Array(d.stats, d.thread * STATS_PER_THREAD * 8, STATS_PER_THREAD);
    const memory = pageAlignedMemory(DIRECT_ALIGN + d.bufferSize);
    this.replyAligned = memory !== undefined;
    this.readReply = memory
      ? Buffer.from(memory, DIRECT_ALIGN - OUT_HEADER_SIZE, OUT_HEADER_SIZE + d.bufferSize)
      : Buffer.allocUnsafe(OUT_HEADER_SIZE + d.bufferSize);
  }

  /** Says it is ready, waits for the mount, then serves until the connection ends. */
  start(): void {
    this.post({ kind: 'ready' });
    while (Atomics.load(this.control, 1) === 0) Atomics.wait(this.control, 1, 0);
    if (Atomics.load(this.control, 1) === 1) this.run();
  }

  private run(): void {
    const { fd, bufferSize } = this.d;
    for (;;) {
      if (this.lent > 0) this.takeBack();
      const request = this.pool.pop() ?? requestBuffer(new ArrayBuffer(bufferSize));
      let length: number;
      try {
        length = fs.readSync(fd, request.bytes, 0, bufferSize, null);
      } catch (err) {
        this.pool.push(request);
        const code = (err as NodeJS.ErrnoException).code;
        // ENOENT: the request was interrupted and withdrawn before we read it. EINTR/EAGAIN: try again.
        if (code === 'ENOENT' || code === 'EINTR' || code === 'EAGAIN') continue;
        // ENODEV: the file system was unmounted or the connection aborted; this is the normal end.
        if (code === 'ENODEV') this.post({ kind: 'end' });
        else this.post({ kind: 'error', code: String(code), message: String((err as Error).message) });
        break;
      }
      this.stats[Stat.requests]!++;
      if (Atomics.load(this.control, 0) !== this.seenGeneration) this.applyControl();
      if (length >= IN_HEADER_SIZE && this.serveDirectly(request, length)) {
        this.pool.push(request);
        continue;
      }
      const buffer = request.bytes.buffer as ArrayBuffer;
      this.lent++;
      parentPort!.postMessage({ kind: 'request', buffer, length } satisfies FromIoThread, [buffer]);
    }
    for (const s of this.sessions.values()) closeFiles(s);
  }

  /** Pools the request buffers the main thread is done with. */
  private takeBack(): void {
    for (let m = receiveMessageOnPort(this.d.returnPort); m; m = receiveMessageOnPort(this.d.returnPort)) {
      this.lent--;
      if (this.pool.length < this.d.maxPooled) this.pool.push(requestBuffer(m.message as ArrayBuffer));
    }
  }

  private post(msg: FromIoThread): void {
    parentPort!.postMessage(msg);
  }

  private applyControl(): void {
    this.seenGeneration = Atomics.load(this.control, 0);
    for (let m = receiveMessageOnPort(this.d.controlPort); m; m = receiveMessageOnPort(this.d.controlPort)) {
      const msg = m.message as ToIoThread;
      switch (msg.t) {
        case 'handle':
          this.handles.set(msg.fh, { nodeid: msg.nodeid, volumeId: msg.volumeId });
          break;
        case 'release':
          this.handles.delete(msg.fh);
          break;
        case 'session': {
          const old = this.sessions.get(msg.volumeId);
          if (old) closeFiles(old);
          const layers = layerFiles(msg.view);
          const head = layers.get(msg.view.headId) ?? {
            id: msg.view.headId,
            path: '',
            fd: undefined,
            directFd: undefined,
          };
          this.sessions.set(msg.volumeId, {
            id: msg.id,
            volumeId: msg.volumeId,
            log: new DirectLog(msg.log),
            blockSize: msg.view.blockSize,
            capacityBytes: msg.view.capacityBytes,
            head,
            headWriteFd: undefined,
            layers,
            index: undefined,
            view: msg.view,
            position: msg.view.position,
            awaitingView: false,
            engineWriteStarts: msg.view.engineWriteStarts,
            engineWriteEnds: msg.view.engineWriteEnds,
          });
          break;
        }
        case 'view': {
          const s = this.sessions.get(msg.volumeId);
          if (!s || s.id !== msg.id) break;
          // Keep the descriptors of layers still named; the head stays the same within a session.
          const layers = layerFiles(msg.view);
          for (const id of layers.keys()) {
            const known = s.layers.get(id);
            if (known) layers.set(id, known);
          }
          for (const [id, layer] of s.layers) if (!layers.has(id)) closeLayer(layer);
          s.layers = layers;
          s.head = layers.get(s.head.id) ?? s.head;
          s.view = msg.view;
          s.index = undefined;
          s.position = msg.view.position;
          s.awaitingView = false;
          s.engineWriteStarts = msg.view.engineWriteStarts;
          s.engineWriteEnds = msg.view.engineWriteEnds;
          break;
        }
        case 'end': {
          const s = this.sessions.get(msg.volumeId);
          if (s && s.id === msg.id) {
            closeFiles(s);
            this.sessions.delete(msg.volumeId);
          }
          break;
        }
      }
    }
  }

  /** Serves a READ or WRITE on the spot; false hands it to the main thread. */
  private serveDirectly(req: RequestBuffer, length: number): boolean {
    const view = req.view;
    const opcode = view.getUint32(4, true);
    if (opcode !== Opcode.READ && opcode !== Opcode.WRITE) return false;
    // fuse_read_in and fuse_write_in both start with fh and offset; size is at 16 in both.
    if (length < IN_HEADER_SIZE + 24) return false;
    const handle = this.handles.get(u64(view, IN_HEADER_SIZE));
    if (!handle || handle.nodeid !== u64(view, 16)) return false;
    const s = this.sessions.get(handle.volumeId);
    if (!s) return false;
    const offset = u64(view, IN_HEADER_SIZE + 8);
    const size = view.getUint32(IN_HEADER_SIZE + 16, true);
    if (size === 0 || offset + size > s.capacityBytes) return false;
    try {
      return opcode === Opcode.READ ? this.read(s, req, offset, size) : this.write(s, req, length, offset, size);
    } catch {
      // Whatever failed here (a layer file gone, an I/O error) is the main thread's to answer, through the engine.
      return false;
    }
  }

  private read(s: Session, request: RequestBuffer, offset: number, size: number): boolean {
    if (s.awaitingView || s.log.state === SessionState.ENDED) return false;
    if (size > this.readReply.length - OUT_HEADER_SIZE) return false;
    if (!this.catchUp(s)) return false;
    const index = s.index!;
    const B = s.blockSize;
    const reply = this.readReply;
    const end = offset + size;
    let pos = offset;
    while (pos < end) {
      const { owner, end: stretchEnd } = index.lookup(Math.floor(pos / B));
      const segmentEnd = Math.min(end, stretchEnd * B);
      const at = OUT_HEADER_SIZE + (pos - offset);
      if (owner) this.readStretch(s, owner, reply, at, segmentEnd - pos, pos);
      else reply.fill(0, at, at + (segmentEnd - pos));
      pos = segmentEnd;
    }
    replyHeader(reply, OUT_HEADER_SIZE + size, request.view);
    this.countDirect(Stat.bytesRead, size);
    this.reply(reply, OUT_HEADER_SIZE + size);
    return true;
  }

  private write(s: Session, request: RequestBuffer, length: number, offset: number, size: number): boolean {
    const B = s.blockSize;
    if (offset % B !== 0 || size % B !== 0) return false;
    if (length < IN_HEADER_SIZE + WRITE_IN_SIZE + size) return false;
    const first = offset / B;
    const end = (offset + size) / B;
    if (s.engineWriteStarts.length > 0 && overlapsRuns(s.engineWriteStarts, s.engineWriteEnds, first, end))
      return false;
    if (!s.log.enter()) return false;
    let recorded = false;
    try {
      s.headWriteFd ??= fs.openSync(s.head.path, 'r+');
      // The data follows fuse_write_in in the request; written from there, with no view made per request.
      const at = IN_HEADER_SIZE + WRITE_IN_SIZE;
      let done = 0;
      while (done < size) done += fs.writeSync(s.headWriteFd, request.bytes, at + done, size - done, offset + done);
      let deadline = 0;
      recorded = s.log.append(first, end, true, false, () => {
        deadline ||= Date.now() + ROOM_WAIT_MS;
        if (s.log.shouldAskForDrain()) this.post({ kind: 'drain', volumeId: s.volumeId, id: s.id });
        s.log.waitForRoom(1);
        return Date.now() < deadline;
      });
      if (recorded && s.log.shouldAskForDrain()) this.post({ kind: 'drain', volumeId: s.volumeId, id: s.id });
    } finally {
      s.log.leave();
    }
    // Not recorded: the bytes sit in the head with no bit, which nothing reads; the main thread writes them again.
    if (!recorded) return false;
    const reply = this.writeReply;
    replyHeader(reply, OUT_HEADER_SIZE + WRITE_OUT_SIZE, request.view);
    reply.writeUInt32LE(size, OUT_HEADER_SIZE);
    this.countDirect(Stat.bytesWritten, size);
    this.reply(reply, reply.length);
    return true;
  }

  /** Applies the log to the session's index; false if it cannot be brought up to date now. */
  private catchUp(s: Session): boolean {
    if (!s.index) {
      const v = s.view!;
      const layers = s.layers;
      s.index = LocationIndex.fromSortedRuns(
        (function* () {
          for (let i = 0; i < v.starts.length; i++) {
            yield { start: v.starts[i]!, end: v.ends[i]!, owner: layers.get(v.owners[i]!)! };
          }
        })(),
      );
      s.view = undefined;
    }
    const tail = s.log.tail;
    let deadline = 0;
    while (s.position < tail) {
      const entry = s.log.read(s.position);
      if (entry === 'pending') {
        // Reserved and being filled in by a writer right now.
        deadline ||= Date.now() + ENTRY_WAIT_MS;
        if (Date.now() > deadline) return false;
        s.log.waitForEntry(s.position, 1);
        continue;
      }
      if (entry === 'overwritten') {
        // We fell more than a log behind: ask for a fresh view and let the main thread answer until then.
        s.awaitingView = true;
        this.post({ kind: 'resync', volumeId: s.volumeId, id: s.id, thread: this.d.thread });
        return false;
      }
      s.index.assign(entry.first, entry.end, entry.toHead ? s.head : null);
      s.position++;
    }
    return true;
  }

  /**
   * Counts a request answered here, before its reply goes out: whoever saw the I/O complete (a test, the
   * bench) then finds it counted, even if this thread is descheduled right after the reply.
   */
  private countDirect(bytesStat: number, bytes: number): void {
    this.stats[Stat.direct]!++;
    this.stats[bytesStat]! += bytes;
  }

  private readFd(layer: LayerFile): number {
    layer.fd ??= fs.openSync(layer.path, 'r');
    return layer.fd;
  }

  /** Reads one stretch of a layer into the reply: large aligned stretches of the head with O_DIRECT. */
  private readStretch(s: Session, layer: LayerFile, reply: Buffer, at: number, length: number, position: number): void {
    if (
      layer.id === s.head.id &&
      length >= DIRECT_READ_MIN &&
      this.replyAligned &&
      layer.directFd !== null &&
      (at - OUT_HEADER_SIZE) % DIRECT_ALIGN === 0 &&
      position % DIRECT_ALIGN === 0 &&
      length % DIRECT_ALIGN === 0
    ) {
      try {
        layer.directFd ??= fs.openSync(layer.path, fs.constants.O_RDONLY | fs.constants.O_DIRECT);
        readLayerBytes(layer.directFd, reply, at, length, position);
        return;
      } catch (err) {
        // A filesystem without O_DIRECT (tmpfs) refuses the open or the read: buffered reads from then on.
        if ((err as NodeJS.ErrnoException).code !== 'EINVAL') throw err;
        if (typeof layer.directFd === 'number') fs.closeSync(layer.directFd);
        layer.directFd = null;
      }
    }
    readLayerBytes(this.readFd(layer), reply, at, length, position);
  }

  private reply(buf: Buffer, length: number): void {
    try {
      fs.writeSync(this.d.fd, buf, 0, length);
    } catch (err) {
      // ENOENT: the request was interrupted and the kernel no longer waits for it. ENODEV: unmounted.
      const code = (err as NodeJS.ErrnoException).code;
      if (code !== 'ENOENT' && code !== 'ENODEV') throw err;
    }
  }
}

/** fuse_out_header of a successful reply: its length, error 0, and the request's unique id (bytes 8-15). */
function replyHeader(reply: Buffer, length: number, request: DataView): void {
  reply.writeUInt32LE(length, 0);
  reply.writeInt32LE(0, 4);
  reply.writeUInt32LE(request.getUint32(8, true), 8);
  reply.writeUInt32LE(request.getUint32(12, true), 12);
}

if (parentPort && (workerData as { ioThread?: IoThreadData } | undefined)?.ioThread) {
  new IoThread((workerData as { ioThread: IoThreadData }).ioThread).start();
}
