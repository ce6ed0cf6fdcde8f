/**
 * What the FUSE server asks of a file system: a small, node-ID based interface, one method a request kind
 * the server forwards. Methods throw FuseError to answer with an errno; anything else thrown becomes EIO.
 */
import type { Attr, Dirent, Statfs } from './protocol.js';

/** An errno answer. `errno` is positive (ENOENT, not -ENOENT); the server negates it on the wire. */
export class FuseError extends Error {
  constructor(
    readonly errno: number,
    message?: string,
  ) {
    super(message ?? `errno ${errno}`);
    this.name = 'FuseError';
  }
}

export interface LookupResult {
  nodeid: number;
  attr: Attr;
}

/** Changes requested by SETATTR; absent fields are left alone. */
export interface AttrChanges {
  size?: number;
  mode?: number;
  uid?: number;
  gid?: number;
  /** atime/mtime/ctime were set (touch, utimes). */
  times?: boolean;
}

export interface OpenResult {
  fh: number;
  /** FOPEN_* flags for the kernel (direct I/O, parallel direct writes). */
  openFlags: number;
}

export interface FuseFilesystem {
  /** Finds `name` in directory `parent`; each success counts one kernel reference (see forget). */
  lookup(parent: number, name: string): LookupResult;
  /** The kernel dropped `nlookup` references to `nodeid`. */
  forget(nodeid: number, nlookup: number): void;
  getattr(nodeid: number): Attr;
  setattr(nodeid: number, changes: AttrChanges): Promise<Attr>;
  open(nodeid: number, flags: number): OpenResult;
  /** Returns at most `size` bytes; fewer at end of file. */
  read(nodeid: number, fh: number, offset: number, size: number): Buffer;
  /** Returns bytes written. `data` is only valid during the call. */
  write(nodeid: number, fh: number, offset: number, data: Buffer): number;
  /** close(2) of one descriptor of the open file. */
  flush(nodeid: number, fh: number): Promise<void>;
  /** Makes everything written so far durable. */
  fsync(nodeid: number, fh: number, datasync: boolean): Promise<void>;
  fallocate(nodeid: number, fh: number, mode: number, offset: number, length: number): Promise<void>;
  release(nodeid: number, fh: number): void;
  opendir(nodeid: number): number;
  /** Entries from `offset` on (offset 0 = start); each carries the offset of the entry after it. */
  readdir(nodeid: number, fh: number, offset: number): Dirent[];
  releasedir(nodeid: number, fh: number): void;
  statfs(nodeid: number): Statfs;
  /** Permission check (only asked without default_permissions); `mask` is R_OK|W_OK|X_OK or F_OK. */
  access(nodeid: number, mask: number, uid: number): void;
}

/** Lets a file system tell the kernel to drop what it cached, when something changes outside a request. */
export interface FuseNotifier {
  /** Forget the cached attributes of a node (its size changed). */
  invalidateInode(nodeid: number): Promise<void>;
  /** Forget a cached name in a directory (the entry went away). */
  invalidateEntry(parent: number, name: string): Promise<void>;
}

/** Implemented by file systems that change outside requests; the server attaches itself once mounted. */
export interface NotifyingFilesystem extends FuseFilesystem {
  attachNotifier(notifier: FuseNotifier | undefined): void;
}
