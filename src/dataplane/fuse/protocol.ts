/**
 * The FUSE kernel ABI (include/uapi/linux/fuse.h): opcodes, flag bits and the byte layout of the structs
 * this server reads and writes. Everything is little-endian host order (x86-64 / arm64) and every struct
 * is padded to 8 bytes by the kernel. Only the parts this server speaks are here.
 *
 * Protocol level: we answer INIT with minor 38 at most; a newer kernel (this machine runs 7.45) then keeps
 * to the 7.38 layouts, which are the ones below.
 */
import { constants as osConstants } from 'node:os';

export const FUSE_KERNEL_VERSION = 7;
/** Highest minor version whose struct layouts this file describes. */
export const FUSE_KERNEL_MINOR_VERSION = 38;
export const FUSE_ROOT_ID = 1;

export const Opcode = {
  LOOKUP: 1,
  FORGET: 2,
  GETATTR: 3,
  SETATTR: 4,
  READLINK: 5,
  SYMLINK: 6,
  MKNOD: 8,
  MKDIR: 9,
  UNLINK: 10,
  RMDIR: 11,
  RENAME: 12,
  LINK: 13,
  OPEN: 14,
  READ: 15,
  WRITE: 16,
  STATFS: 17,
  RELEASE: 18,
  FSYNC: 20,
  SETXATTR: 21,
  GETXATTR: 22,
  LISTXATTR: 23,
  REMOVEXATTR: 24,
  FLUSH: 25,
  INIT: 26,
  OPENDIR: 27,
  READDIR: 28,
  RELEASEDIR: 29,
  FSYNCDIR: 30,
  GETLK: 31,
  SETLK: 32,
  SETLKW: 33,
  ACCESS: 34,
  CREATE: 35,
  INTERRUPT: 36,
  BMAP: 37,
  DESTROY: 38,
  IOCTL: 39,
  POLL: 40,
  NOTIFY_REPLY: 41,
  BATCH_FORGET: 42,
  FALLOCATE: 43,
  READDIRPLUS: 44,
  RENAME2: 45,
  LSEEK: 46,
  COPY_FILE_RANGE: 47,
  SYNCFS: 50,
  TMPFILE: 51,
} as const;

const OPCODE_NAMES = new Map<number, string>(Object.entries(Opcode).map(([k, v]) => [v, k]));

/** A readable name for logs ("WRITE", or "opcode 99" for ones we do not know). */
export function opcodeName(opcode: number): string {
  return OPCODE_NAMES.get(opcode) ?? `opcode ${opcode}`;
}

/** INIT flags (the low 32 bits; bits 32..63 travel in flags2 and none of them is used here). */
export const InitFlag = {
  ASYNC_READ: 1 << 0,
  POSIX_LOCKS: 1 << 1,
  ATOMIC_O_TRUNC: 1 << 3,
  BIG_WRITES: 1 << 5,
  DONT_MASK: 1 << 6,
  SPLICE_WRITE: 1 << 7,
  SPLICE_MOVE: 1 << 8,
  SPLICE_READ: 1 << 9,
  FLOCK_LOCKS: 1 << 10,
  AUTO_INVAL_DATA: 1 << 12,
  DO_READDIRPLUS: 1 << 13,
  ASYNC_DIO: 1 << 15,
  WRITEBACK_CACHE: 1 << 16,
  PARALLEL_DIROPS: 1 << 18,
  MAX_PAGES: 1 << 22,
  INIT_EXT: 1 << 30,
} as const;

/** Flags of fuse_open_out.open_flags. */
export const OpenOutFlag = {
  DIRECT_IO: 1 << 0,
  KEEP_CACHE: 1 << 1,
  NONSEEKABLE: 1 << 2,
  CACHE_DIR: 1 << 3,
  PARALLEL_DIRECT_WRITES: 1 << 6,
} as const;

/** fuse_setattr_in.valid bits. */
export const SetattrValid = {
  MODE: 1 << 0,
  UID: 1 << 1,
  GID: 1 << 2,
  SIZE: 1 << 3,
  ATIME: 1 << 4,
  MTIME: 1 << 5,
  FH: 1 << 6,
  ATIME_NOW: 1 << 7,
  MTIME_NOW: 1 << 8,
  LOCKOWNER: 1 << 9,
  CTIME: 1 << 10,
  KILL_SUIDGID: 1 << 11,
} as const;

/** fallocate(2) mode bits as the kernel forwards them. */
export const FallocMode = {
  KEEP_SIZE: 0x01,
  PUNCH_HOLE: 0x02,
  ZERO_RANGE: 0x10,
} as const;

export const FSYNC_FDATASYNC = 1 << 0;

/** Notification codes, sent in the error field of an out header whose unique is 0. */
export const NotifyCode = {
  INVAL_INODE: 2,
  INVAL_ENTRY: 3,
} as const;

/** File type bits of st_mode and the matching dirent types. */
export const S_IFDIR = 0o040000;
export const S_IFREG = 0o100000;
export const DT_DIR = 4;
export const DT_REG = 8;

/** errno values from Node's table for this platform, so nothing here hard-codes Linux numbers twice. */
export const Errno = {
  EPERM: osConstants.errno.EPERM,
  ENOENT: osConstants.errno.ENOENT,
  EIO: osConstants.errno.EIO,
  EBADF: osConstants.errno.EBADF,
  EACCES: osConstants.errno.EACCES,
  EBUSY: osConstants.errno.EBUSY,
  ENOTDIR: osConstants.errno.ENOTDIR,
  EISDIR: osConstants.errno.EISDIR,
  EINVAL: osConstants.errno.EINVAL,
  EFBIG: osConstants.errno.EFBIG,
  ENOSPC: osConstants.errno.ENOSPC,
  ENAMETOOLONG: osConstants.errno.ENAMETOOLONG,
  ENOSYS: osConstants.errno.ENOSYS,
  EPROTO: osConstants.errno.EPROTO,
  EOPNOTSUPP: osConstants.errno.EOPNOTSUPP,
  ENODEV: osConstants.errno.ENODEV,
} as const;

// ------------------------------------------------------------------ sizes

export const IN_HEADER_SIZE = 40;
export const OUT_HEADER_SIZE = 16;
export const ATTR_SIZE = 88;
export const ENTRY_OUT_SIZE = 40 + ATTR_SIZE;
export const ATTR_OUT_SIZE = 16 + ATTR_SIZE;
export const OPEN_OUT_SIZE = 16;
export const WRITE_OUT_SIZE = 8;
export const STATFS_OUT_SIZE = 80;
export const INIT_OUT_SIZE = 64;
export const WRITE_IN_SIZE = 40;
export const DIRENT_HEADER_SIZE = 24;

// ------------------------------------------------------------------ requests

/** fuse_in_header: the fixed start of every request. */
export interface InHeader {
  /** Total request length in bytes, header included. */
  len: number;
  opcode: number;
  /** Request ID; the reply must carry it. Kept as bigint: it is an opaque 64-bit counter. */
  unique: bigint;
  nodeid: number;
  uid: number;
  gid: number;
  pid: number;
}

export function decodeInHeader(buf: Buffer): InHeader {
  if (buf.length < IN_HEADER_SIZE) throw new ProtocolError(`request of ${buf.length} bytes is shorter than its header`);
  return {
    len: buf.readUInt32LE(0),
    opcode: buf.readUInt32LE(4),
    unique: buf.readBigUInt64LE(8),
    nodeid: u64(buf, 16),
    uid: buf.readUInt32LE(24),
    gid: buf.readUInt32LE(28),
    pid: buf.readUInt32LE(32),
  };
}

/** Raised when the kernel sends something that cannot be parsed (a short body, an unterminated name). */
export class ProtocolError extends Error {}

/** Reads a u64 that this server uses as a plain number (offsets, sizes, node IDs, handles: all below 2^53). */
function u64(buf: Buffer, at: number): number {
  const v = buf.readBigUInt64LE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError(`64-bit field ${v} is beyond 2^53`);
  return Number(v);
}

function need(body: Buffer, size: number, what: string): void {
  if (body.length < size) throw new ProtocolError(`${what}: body has ${body.length} bytes, needs ${size}`);
}

/** A NUL-terminated name (LOOKUP and friends). */
export function decodeName(body: Buffer): string {
  const end = body.indexOf(0);
  if (end < 0) throw new ProtocolError('name is not NUL-terminated');
  return body.toString('utf8', 0, end);
}

export interface InitIn {
  major: number;
  minor: number;
  maxReadahead: number;
  flags: number;
}

export function decodeInitIn(body: Buffer): InitIn {
  need(body, 16, 'INIT');
  return {
    major: body.readUInt32LE(0),
    minor: body.readUInt32LE(4),
    maxReadahead: body.readUInt32LE(8),
    flags: body.readUInt32LE(12),
  };
}

export interface SetattrIn {
  valid: number;
  fh: number;
  size: number;
  mode: number;
  uid: number;
  gid: number;
}

export function decodeSetattrIn(body: Buffer): SetattrIn {
  need(body, 88, 'SETATTR');
  return {
    valid: body.readUInt32LE(0),
    fh: u64(body, 8),
    size: u64(body, 16),
    mode: body.readUInt32LE(68),
    uid: body.readUInt32LE(76),
    gid: body.readUInt32LE(80),
  };
}

/** fuse_open_in: the open(2) flags (access mode, O_DIRECT, ...). */
export function decodeOpenIn(body: Buffer): { flags: number } {
  need(body, 8, 'OPEN');
  return { flags: body.readUInt32LE(0) };
}

export interface ReadIn {
  fh: number;
  offset: number;
  size: number;
}

export function decodeReadIn(body: Buffer): ReadIn {
  need(body, 24, 'READ');
  return { fh: u64(body, 0), offset: u64(body, 8), size: body.readUInt32LE(16) };
}

export interface WriteIn {
  fh: number;
  offset: number;
  /** The bytes to write: a view into the request buffer, valid only while the request is being handled. */
  data: Buffer;
}

export function decodeWriteIn(body: Buffer): WriteIn {
  need(body, WRITE_IN_SIZE, 'WRITE');
  const size = body.readUInt32LE(16);
  need(body, WRITE_IN_SIZE + size, 'WRITE data');
  return { fh: u64(body, 0), offset: u64(body, 8), data: body.subarray(WRITE_IN_SIZE, WRITE_IN_SIZE + size) };
}

/** RELEASE, RELEASEDIR, FLUSH and FSYNC all start with the file handle. */
export function decodeFh(body: Buffer, what: string): number {
  need(body, 8, what);
  return u64(body, 0);
}

export function decodeFsyncIn(body: Buffer): { fh: number; datasync: boolean } {
  need(body, 12, 'FSYNC');
  return { fh: u64(body, 0), datasync: (body.readUInt32LE(8) & FSYNC_FDATASYNC) !== 0 };
}

export interface FallocateIn {
  fh: number;
  offset: number;
  length: number;
  mode: number;
}

export function decodeFallocateIn(body: Buffer): FallocateIn {
  need(body, 28, 'FALLOCATE');
  return { fh: u64(body, 0), offset: u64(body, 8), length: u64(body, 16), mode: body.readUInt32LE(24) };
}

export function decodeForgetIn(body: Buffer): number {
  need(body, 8, 'FORGET');
  return u64(body, 0);
}

/** BATCH_FORGET: a count, then (nodeid, nlookup) pairs. */
export function decodeBatchForgetIn(body: Buffer): Array<{ nodeid: number; nlookup: number }> {
  need(body, 8, 'BATCH_FORGET');
  const count = body.readUInt32LE(0);
  need(body, 8 + count * 16, 'BATCH_FORGET entries');
  const out: Array<{ nodeid: number; nlookup: number }> = [];
  for (let i = 0; i < count; i++) out.push({ nodeid: u64(body, 8 + i * 16), nlookup: u64(body, 16 + i * 16) });
  return out;
}

export function decodeAccessIn(body: Buffer): { mask: number } {
  need(body, 4, 'ACCESS');
  return { mask: body.readUInt32LE(0) };
}

// ------------------------------------------------------------------ replies

/** An out header; `error` is 0 or a negative errno. */
export function encodeOutHeader(payloadLength: number, error: number, unique: bigint): Buffer {
  const b = Buffer.alloc(OUT_HEADER_SIZE);
  b.writeUInt32LE(OUT_HEADER_SIZE + payloadLength, 0);
  b.writeInt32LE(error, 4);
  b.writeBigUInt64LE(unique, 8);
  return b;
}

/** What the kernel caches about an inode (struct fuse_attr). Times are milliseconds since the epoch. */
export interface Attr {
  ino: number;
  size: number;
  /** st_blocks, in 512-byte units. */
  blocks: number;
  atimeMs: number;
  mtimeMs: number;
  ctimeMs: number;
  mode: number;
  nlink: number;
  uid: number;
  gid: number;
  /** st_blksize: the preferred I/O size. */
  blksize: number;
}

function writeTime(b: Buffer, secAt: number, nsecAt: number, ms: number): void {
  const sec = Math.floor(ms / 1000);
  b.writeBigUInt64LE(BigInt(sec), secAt);
  b.writeUInt32LE(Math.round((ms - sec * 1000) * 1e6), nsecAt);
}

function writeAttr(b: Buffer, at: number, a: Attr): void {
  b.writeBigUInt64LE(BigInt(a.ino), at);
  b.writeBigUInt64LE(BigInt(a.size), at + 8);
  b.writeBigUInt64LE(BigInt(a.blocks), at + 16);
  writeTime(b, at + 24, at + 48, a.atimeMs);
  writeTime(b, at + 32, at + 52, a.mtimeMs);
  writeTime(b, at + 40, at + 56, a.ctimeMs);
  b.writeUInt32LE(a.mode, at + 60);
  b.writeUInt32LE(a.nlink, at + 64);
  b.writeUInt32LE(a.uid, at + 68);
  b.writeUInt32LE(a.gid, at + 72);
  b.writeUInt32LE(0, at + 76); // rdev
  b.writeUInt32LE(a.blksize, at + 80);
  b.writeUInt32LE(0, at + 84); // flags
}

/** Splits a cache lifetime in seconds into the (seconds, nanoseconds) pair the kernel wants. */
function splitValid(seconds: number): [bigint, number] {
  const whole = Math.floor(seconds);
  return [BigInt(whole), Math.round((seconds - whole) * 1e9)];
}

export interface Entry {
  nodeid: number;
  generation: number;
  /** How long the kernel may cache the name → node binding, in seconds. */
  entryValidSec: number;
  /** How long the kernel may cache the attributes, in seconds. */
  attrValidSec: number;
  attr: Attr;
}

export function encodeEntryOut(e: Entry): Buffer {
  const b = Buffer.alloc(ENTRY_OUT_SIZE);
  const [es, ens] = splitValid(e.entryValidSec);
  const [as, ans] = splitValid(e.attrValidSec);
  b.writeBigUInt64LE(BigInt(e.nodeid), 0);
  b.writeBigUInt64LE(BigInt(e.generation), 8);
  b.writeBigUInt64LE(es, 16);
  b.writeBigUInt64LE(as, 24);
  b.writeUInt32LE(ens, 32);
  b.writeUInt32LE(ans, 36);
  writeAttr(b, 40, e.attr);
  return b;
}

export function encodeAttrOut(attr: Attr, attrValidSec: number): Buffer {
  const b = Buffer.alloc(ATTR_OUT_SIZE);
  const [s, ns] = splitValid(attrValidSec);
  b.writeBigUInt64LE(s, 0);
  b.writeUInt32LE(ns, 8);
  writeAttr(b, 16, attr);
  return b;
}

export function encodeOpenOut(fh: number, openFlags: number): Buffer {
  const b = Buffer.alloc(OPEN_OUT_SIZE);
  b.writeBigUInt64LE(BigInt(fh), 0);
  b.writeUInt32LE(openFlags, 8);
  return b;
}

export function encodeWriteOut(size: number): Buffer {
  const b = Buffer.alloc(WRITE_OUT_SIZE);
  b.writeUInt32LE(size, 0);
  return b;
}

export interface Statfs {
  blocks: number;
  bfree: number;
  bavail: number;
  files: number;
  ffree: number;
  bsize: number;
  namelen: number;
  frsize: number;
}

export function encodeStatfsOut(s: Statfs): Buffer {
  const b = Buffer.alloc(STATFS_OUT_SIZE);
  b.writeBigUInt64LE(BigInt(s.blocks), 0);
  b.writeBigUInt64LE(BigInt(s.bfree), 8);
  b.writeBigUInt64LE(BigInt(s.bavail), 16);
  b.writeBigUInt64LE(BigInt(s.files), 24);
  b.writeBigUInt64LE(BigInt(s.ffree), 32);
  b.writeUInt32LE(s.bsize, 40);
  b.writeUInt32LE(s.namelen, 44);
  b.writeUInt32LE(s.frsize, 48);
  return b;
}

export interface InitOut {
  major: number;
  minor: number;
  maxReadahead: number;
  flags: number;
  maxBackground: number;
  congestionThreshold: number;
  maxWrite: number;
  /** Timestamp granularity in nanoseconds. */
  timeGran: number;
  /** Most pages in one request; only honoured with the MAX_PAGES flag. */
  maxPages: number;
}

export function encodeInitOut(o: InitOut): Buffer {
  const b = Buffer.alloc(INIT_OUT_SIZE);
  b.writeUInt32LE(o.major, 0);
  b.writeUInt32LE(o.minor, 4);
  b.writeUInt32LE(o.maxReadahead, 8);
  b.writeUInt32LE(o.flags >>> 0, 12);
  b.writeUInt16LE(o.maxBackground, 16);
  b.writeUInt16LE(o.congestionThreshold, 18);
  b.writeUInt32LE(o.maxWrite, 20);
  b.writeUInt32LE(o.timeGran, 24);
  b.writeUInt16LE(o.maxPages, 28);
  return b;
}

export function decodeInitOut(b: Buffer): InitOut {
  need(b, INIT_OUT_SIZE, 'INIT reply');
  return {
    major: b.readUInt32LE(0),
    minor: b.readUInt32LE(4),
    maxReadahead: b.readUInt32LE(8),
    flags: b.readUInt32LE(12),
    maxBackground: b.readUInt16LE(16),
    congestionThreshold: b.readUInt16LE(18),
    maxWrite: b.readUInt32LE(20),
    timeGran: b.readUInt32LE(24),
    maxPages: b.readUInt16LE(28),
  };
}

/** One directory entry of a READDIR reply. `nextOffset` is the offset a later READDIR resumes from. */
export interface Dirent {
  ino: number;
  nextOffset: number;
  type: number;
  name: string;
}

/** Size of a dirent record: header plus name, rounded up to 8 bytes. */
export function direntSize(nameBytes: number): number {
  return (DIRENT_HEADER_SIZE + nameBytes + 7) & ~7;
}

/** Packs as many entries as fit in `maxBytes`, in order; the kernel asks again from the last nextOffset. */
export function encodeDirents(entries: readonly Dirent[], maxBytes: number): Buffer {
  const parts: Buffer[] = [];
  let used = 0;
  for (const e of entries) {
    const name = Buffer.from(e.name, 'utf8');
    const size = direntSize(name.length);
    if (used + size > maxBytes) break;
    const b = Buffer.alloc(size);
    b.writeBigUInt64LE(BigInt(e.ino), 0);
    b.writeBigUInt64LE(BigInt(e.nextOffset), 8);
    b.writeUInt32LE(name.length, 16);
    b.writeUInt32LE(e.type, 20);
    name.copy(b, DIRENT_HEADER_SIZE);
    parts.push(b);
    used += size;
  }
  return Buffer.concat(parts, used);
}

/** FUSE_NOTIFY_INVAL_INODE: drop cached attributes (offset -1: leave the page cache alone). */
export function encodeNotifyInvalInode(nodeid: number): Buffer {
  const body = Buffer.alloc(24);
  body.writeBigUInt64LE(BigInt(nodeid), 0);
  body.writeBigInt64LE(-1n, 8);
  body.writeBigInt64LE(0n, 16);
  return Buffer.concat([encodeOutHeader(body.length, NotifyCode.INVAL_INODE, 0n), body]);
}

/** FUSE_NOTIFY_INVAL_ENTRY: drop a cached name in a directory. */
export function encodeNotifyInvalEntry(parent: number, name: string): Buffer {
  const nameBytes = Buffer.from(name, 'utf8');
  const body = Buffer.alloc(16 + nameBytes.length + 1);
  body.writeBigUInt64LE(BigInt(parent), 0);
  body.writeUInt32LE(nameBytes.length, 8);
  nameBytes.copy(body, 16);
  return Buffer.concat([encodeOutHeader(body.length, NotifyCode.INVAL_ENTRY, 0n), body]);
}
