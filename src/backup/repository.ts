/**
 * The backup repository on disk (docs/backup-repository.md):
 *
 *   REPO/cbt-backup-repository.json   marker: format and creation time
 *   REPO/chunks/ab/ab…(64 hex)        chunk bytes, named by their SHA-256; stored once however often used
 *   REPO/backups/<id>.json            one manifest per committed backup
 *   REPO/tmp/                         temp files of a backup in progress
 *   REPO/lock                         PID of the process writing, while it writes
 *
 * A backup writes its chunks (each to tmp/, renamed into place, fsync'd in the background), then its
 * manifest (temp, fsync, rename, directory fsync). The manifest's rename is the commit: a backup killed before it leaves only
 * garbage that no manifest names, removed by the next writer, and the repository stays valid.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { DIR_MODE, FILE_MODE, fsyncDir, fsyncFile, mkdirPrivate, tempName, writeFileDurably } from './durable-files.js';
import type { Extent } from '../client/index.js';
import { allocAligned, createFile, FileTooLarge, readFileInto } from './direct-io.js';
import {
  BACKUP_ID,
  MANIFEST_FORMAT,
  parseManifest,
  SHA256_HEX,
  type Manifest,
  type ManifestExtent,
} from './manifest.js';
import { lockExclusive } from './repository-lock.js';
import { HASH_THREADS, Sha256Threads, sha256 } from './sha256-threads.js';
import { DIRECT_ALIGN } from '../aligned-memory.js';

export const MARKER = 'cbt-backup-repository.json';
const REPOSITORY_FORMAT = 'cbt-csi-backup-repository';
const SUBDIRS = ['chunks', 'backups', 'tmp'];
/** A temp file of ours (durable-files.ts tempName): `.NAME.PID.RANDOM.tmp`. */
const TEMP_FILE = /^\..+\.[0-9]+\.[0-9a-f]{8}\.tmp$/;
/** The marker's temp file, left in the directory by a backup killed while it made the repository. */
const MARKER_TEMP = /^\.cbt-backup-repository\.json\.[0-9]+\.[0-9a-f]{8}\.tmp$/;

/** What went wrong, in a form the commands map to exit codes: 'usage' errors are the caller's (exit 2). */
export class RepositoryError extends Error {
  constructor(
    readonly kind: 'usage' | 'damaged' | 'busy',
    message: string,
  ) {
    super(message);
    this.name = 'RepositoryError';
  }
}

/** A chunk that cannot be used, and why. */
export class ChunkProblem extends RepositoryError {
  constructor(
    readonly chunk: string,
    readonly problem: DamagedChunk['problem'],
    message: string,
    /** Bytes read before the problem showed (a chunk whose hash does not match was read whole). */
    readonly bytesRead = 0,
  ) {
    super('damaged', message);
  }
}

/** A damaged or missing chunk and every backup that cannot be restored because of it. */
export interface DamagedChunk {
  chunk: string;
  problem: 'missing' | 'hash mismatch' | 'unreadable';
  /** Backups whose chain needs the chunk. */
  breaks: string[];
}

/** Where verify says how far it is: the bytes it will check, then each chunk's bytes as it is checked. */
export interface VerifyProgress {
  total(bytes: number): void;
  add(bytes: number): void;
}

export interface VerifyReport {
  backups: string[];
  chunksChecked: number;
  bytesChecked: number;
  damaged: DamagedChunk[];
  /** Manifests that cannot be read, with why. */
  damagedManifests: { id: string; problem: string }[];
}

/** The hex SHA-256 of a chunk's bytes (Sha256Threads.hash, or sha256 here). */
export type ChunkHasher = (data: Buffer) => Promise<string>;
const inlineHasher: ChunkHasher = async (data) => sha256(data);

export class BackupRepository {
  private constructor(readonly dir: string) {}

  private get chunksDir(): string {
    return path.join(this.dir, 'chunks');
  }
  private get backupsDir(): string {
    return path.join(this.dir, 'backups');
  }
  get tmpDir(): string {
    return path.join(this.dir, 'tmp');
  }

  chunkPath(hash: string): string {
    return path.join(this.chunksDir, hash.slice(0, 2), hash);
  }

  /**
   * Checks that `dir` can hold a repository without changing anything: absent, an empty directory, or a
   * repository. Returns whether it is one already.
   */
  static async check(dir: string): Promise<'repository' | 'absent' | 'empty'> {
    const st = await fs.promises.stat(dir).catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return undefined;
      if (err.code === 'ENOTDIR')
        throw new RepositoryError('usage', `${dir} cannot be a backup repository: a file is on its path`);
      throw err;
    });
    if (!st) return 'absent';
    if (!st.isDirectory()) throw new RepositoryError('usage', `${dir} is not a directory, so not a backup repository`);
    if (fs.existsSync(path.join(dir, MARKER))) return 'repository';
    if (await BackupRepository.onlyHalfMade(dir)) return 'empty';
    throw new RepositoryError(
      'usage',
      `${dir} is not a backup repository (no ${MARKER}) and not empty: give a new or empty directory, or an existing repository`,
    );
  }

  /**
   * Whether `dir` holds nothing, or only what a backup killed while it made the repository left: empty
   * chunks/, backups/ and tmp/ directories and the marker's temp file.
   */
  private static async onlyHalfMade(dir: string): Promise<boolean> {
    for (const name of await fs.promises.readdir(dir)) {
      if (MARKER_TEMP.test(name)) continue;
      if (!SUBDIRS.includes(name)) return false;
      const st = await fs.promises.lstat(path.join(dir, name));
      if (!st.isDirectory() || (await fs.promises.readdir(path.join(dir, name))).length > 0) return false;
    }
    return true;
  }

  /** Opens an existing repository; a directory that is not one is a usage error. */
  static async open(dir: string): Promise<BackupRepository> {
    const abs = path.resolve(dir);
    const kind = await BackupRepository.check(abs);
    if (kind !== 'repository') throw new RepositoryError('usage', `${abs} is not a backup repository (no ${MARKER})`);
    let marker: { format?: string; version?: number };
    try {
      const parsed: unknown = JSON.parse(await fs.promises.readFile(path.join(abs, MARKER), 'utf8'));
      if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed))
        throw new Error('it holds no JSON object');
      marker = parsed as typeof marker;
    } catch (err) {
      throw new RepositoryError('damaged', `${path.join(abs, MARKER)} is damaged: ${(err as Error).message}`);
    }
    if (marker.format !== REPOSITORY_FORMAT || marker.version !== 1) {
      throw new RepositoryError(
        'usage',
        `${abs} holds a repository of an unknown format (${String(marker.format)} v${String(marker.version)})`,
      );
    }
    // What holds the backups must be there: a missing backups/ listed as no backups, so verify said ok.
    for (const sub of ['backups', 'chunks']) {
      const st = await fs.promises.stat(path.join(abs, sub)).catch(() => undefined);
      if (!st?.isDirectory())
        throw new RepositoryError('damaged', `repository ${abs} is damaged: its ${sub}/ directory is missing`);
    }
    return new BackupRepository(abs);
  }

  /** Opens the repository at `dir`, creating it (0700) if `dir` is absent or empty. */
  static async openOrCreate(dir: string): Promise<BackupRepository> {
    const abs = path.resolve(dir);
    if ((await BackupRepository.check(abs)) !== 'repository') {
      await mkdirPrivate(abs).catch((err: NodeJS.ErrnoException) => {
        // A missing disk behind a symlink, /proc, a file on the way, a read-only place: the caller's to fix.
        if (['ENOENT', 'ENOTDIR', 'EEXIST', 'EACCES', 'EPERM', 'EROFS'].includes(err.code ?? ''))
          throw new RepositoryError('usage', `repository ${abs} cannot be made: ${err.message}`);
        throw err;
      });
      // An empty directory given keeps its mode through mkdir: the repository is private whatever it was.
      await fs.promises.chmod(abs, DIR_MODE);
      // A marker temp file a killed backup left stays: it may as well be another first backup's, mid-write.
      for (const sub of SUBDIRS) {
        await mkdirPrivate(path.join(abs, sub));
        await fs.promises.chmod(path.join(abs, sub), DIR_MODE);
      }
      await fsyncDir(abs);
      // The marker last: a directory without it is still "empty enough" to be made a repository again.
      await writeFileDurably(
        path.join(abs, MARKER),
        `${JSON.stringify({ format: REPOSITORY_FORMAT, version: 1, created: new Date().toISOString() })}\n`,
      );
    }
    return BackupRepository.open(abs);
  }

  /** IDs of committed backups, oldest first. */
  async backupIds(): Promise<string[]> {
    const names = await fs.promises.readdir(this.backupsDir);
    return names
      .filter((n) => n.endsWith('.json') && BACKUP_ID.test(n.slice(0, -5)))
      .map((n) => n.slice(0, -5))
      .sort();
  }

  async manifest(id: string): Promise<Manifest> {
    if (!BACKUP_ID.test(id))
      throw new RepositoryError(
        'usage',
        `${JSON.stringify(id)} is not a backup ID (they look like 20260130T120000.123Z-1a2b3c4d; list them with \`cbt-csi verify --repo ${this.dir}\`)`,
      );
    let text: string;
    try {
      text = await fs.promises.readFile(path.join(this.backupsDir, `${id}.json`), 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT')
        throw new RepositoryError('usage', `backup ${id} is not in the repository ${this.dir}`);
      throw err;
    }
    try {
      return parseManifest(text, id);
    } catch (err) {
      throw new RepositoryError('damaged', (err as Error).message);
    }
  }

  /** The backups restoring `id` needs, the full backup first and `id` last. */
  async chain(id: string): Promise<Manifest[]> {
    const out: Manifest[] = [];
    const seen = new Set<string>();
    for (let next: string | null = id; next !== null; ) {
      if (seen.has(next)) throw new RepositoryError('damaged', `backup ${id}: its chain of bases loops at ${next}`);
      seen.add(next);
      let m: Manifest;
      try {
        m = await this.manifest(next);
      } catch (err) {
        if (next !== id && err instanceof RepositoryError)
          throw new RepositoryError('damaged', `backup ${id} needs base ${next}: ${err.message}`);
        throw err;
      }
      out.push(m);
      next = m.base;
    }
    return out.reverse();
  }

  /**
   * Reads chunk `hash` into `into` (at least as long as any chunk; an aligned buffer is read with O_DIRECT,
   * since a chunk read for a restore or a check is not read again soon) and checks its SHA-256 with `hasher`.
   * Returns the chunk's bytes, a view of `into`; throws a ChunkProblem naming the chunk and what is wrong.
   */
  async loadChunk(hash: string, into: Buffer, hasher: ChunkHasher = inlineHasher): Promise<Buffer> {
    let data: Buffer;
    try {
      data = await readFileInto(this.chunkPath(hash), into);
    } catch (err) {
      if (err instanceof FileTooLarge)
        throw new ChunkProblem(
          hash,
          'hash mismatch',
          `chunk ${hash} is damaged: it holds ${err.size} bytes, more than a chunk`,
        );
      const missing = (err as NodeJS.ErrnoException).code === 'ENOENT';
      throw new ChunkProblem(
        hash,
        missing ? 'missing' : 'unreadable',
        `chunk ${hash} is ${missing ? 'missing' : `unreadable: ${(err as Error).message}`}`,
      );
    }
    if ((await hasher(data)) !== hash)
      throw new ChunkProblem(
        hash,
        'hash mismatch',
        `chunk ${hash} is damaged: its content does not match its SHA-256`,
        data.length,
      );
    return data;
  }

  /** Takes the writer lock (one backup at a time), clearing what a killed writer left behind. */
  async lock(): Promise<RepositoryLock> {
    const lockPath = path.join(this.dir, 'lock');
    const release = lockExclusive(lockPath);
    if (!release) {
      const pid = Number((await fs.promises.readFile(lockPath, 'utf8').catch(() => '')).trim());
      const who = Number.isSafeInteger(pid) && pid > 0 ? ` (process ${pid}, as seen in its own PID namespace)` : '';
      throw new RepositoryError('busy', `another backup${who} is writing to ${this.dir}; wait for it to finish`);
    }
    const lock = new RepositoryLock(release);
    try {
      // tmp/ holds nothing that lasts: one lost is made again.
      await mkdirPrivate(this.tmpDir);
      await this.collectGarbage();
    } catch (err) {
      await lock.release();
      throw err;
    }
    return lock;
  }

  /**
   * Removes what a killed backup left (it holds the lock): our temp files in tmp/, and chunk files no
   * committed manifest names. Only names a backup makes, and only regular files: a stray file or a symlink
   * planted in the repository does not make it remove anything else.
   */
  private async collectGarbage(): Promise<void> {
    await this.removeTemps();
    const referenced = await this.referencedChunks().catch(() => undefined);
    // A damaged manifest means we cannot tell garbage from data: remove nothing.
    if (!referenced) return;
    for (const sub of await fs.promises.readdir(this.chunksDir).catch(() => [] as string[])) {
      const dir = path.join(this.chunksDir, sub);
      if (!/^[0-9a-f]{2}$/.test(sub) || !(await fs.promises.lstat(dir)).isDirectory()) continue;
      for (const name of await fs.promises.readdir(dir).catch(() => [] as string[])) {
        const file = path.join(dir, name);
        if (SHA256_HEX.test(name) && name.startsWith(sub) && !referenced.has(name) && (await isRegularFile(file)))
          await fs.promises.rm(file, { force: true });
      }
    }
  }

  /** Removes our temp files from tmp/ (regular files with the names tempName gives). Holds the lock. */
  async removeTemps(): Promise<void> {
    for (const name of await fs.promises.readdir(this.tmpDir).catch(() => [] as string[])) {
      const file = path.join(this.tmpDir, name);
      if (TEMP_FILE.test(name) && (await isRegularFile(file))) await fs.promises.rm(file, { force: true });
    }
  }

  /** Every chunk named by a committed manifest, with the backups naming it directly. */
  async referencedChunks(): Promise<Map<string, string[]>> {
    const out = new Map<string, string[]>();
    for (const id of await this.backupIds()) {
      const m = await this.manifest(id);
      for (const [, , hash] of m.extents) {
        const list = out.get(hash);
        if (list) {
          if (list.at(-1) !== id) list.push(id);
        } else out.set(hash, [id]);
      }
    }
    return out;
  }

  /** Starts a backup; nothing is visible until commit(). Needs the lock. */
  async begin(
    meta: Omit<Manifest, 'format' | 'id' | 'extents' | 'bytes' | 'created'>,
    lock: RepositoryLock,
    hash: ChunkHasher = inlineHasher,
  ): Promise<BackupWriter> {
    if (!lock.held) throw new Error('begin() needs the repository lock');
    const known = new Set((await this.referencedChunks()).keys());
    return new BackupWriter(this, meta, known, hash);
  }

  /** Re-checks every chunk of the given backups (all by default) and reports what is damaged and what it breaks. */
  async verify(ids?: string[], progress?: VerifyProgress, signal?: AbortSignal): Promise<VerifyReport> {
    const all = await this.backupIds();
    const wanted = ids ?? all;
    const damagedManifests: VerifyReport['damagedManifests'] = [];
    const manifests = new Map<string, Manifest>();
    for (const id of all) {
      try {
        manifests.set(id, await this.manifest(id));
      } catch (err) {
        damagedManifests.push({ id, problem: (err as Error).message });
      }
    }
    // The chains of the wanted backups decide which chunks to check; every backup whose chain
    // needs a chunk is reported broken with it.
    const chainOf = (id: string): string[] | undefined => {
      const out: string[] = [];
      for (let next: string | null = id; next !== null; next = manifests.get(next)?.base ?? null) {
        if (!manifests.has(next) || out.includes(next)) return undefined;
        out.push(next);
      }
      return out;
    };
    /** Why `id`'s chain is broken: the first base that is missing or damaged, or the loop. */
    const brokenLink = (id: string): string => {
      const seen: string[] = [];
      for (let next: string | null = id; next !== null; next = manifests.get(next)?.base ?? null) {
        if (seen.includes(next)) return `its chain of bases loops at ${next}`;
        if (!manifests.has(next)) return `its base ${next} is missing or damaged`;
        seen.push(next);
      }
      return 'its chain is broken';
    };
    const users = new Map<string, Set<string>>();
    for (const id of all) {
      const chain = chainOf(id);
      if (!chain) {
        if (!damagedManifests.some((d) => d.id === id))
          damagedManifests.push({ id, problem: `backup ${id}: ${brokenLink(id)}` });
        continue;
      }
      for (const member of chain) {
        for (const [, , hash] of manifests.get(member)!.extents) {
          let set = users.get(hash);
          if (!set) {
            set = new Set();
            users.set(hash, set);
          }
          set.add(id);
        }
      }
    }
    const toCheck = new Set<string>();
    for (const id of wanted) {
      if (!all.includes(id)) throw new RepositoryError('usage', `backup ${id} is not in the repository ${this.dir}`);
      for (const member of chainOf(id) ?? [])
        for (const [, , hash] of manifests.get(member)!.extents) toCheck.add(hash);
    }
    // CHECKS_IN_FLIGHT chunks read at once, each into its own buffer, hashed on the hash threads in place.
    const list = [...toCheck];
    // A chunk holds the bytes its extents name, so the furthest of them is its size.
    const sizes = new Map<string, number>();
    for (const m of manifests.values())
      for (const [, length, hash, chunkOffset] of m.extents)
        if (toCheck.has(hash)) sizes.set(hash, Math.max(sizes.get(hash) ?? 0, chunkOffset + length));
    progress?.total([...sizes.values()].reduce((a, b) => a + b, 0));
    const found: { at: number; damage: DamagedChunk }[] = [];
    /** Sound chunks that some manifest reads past the end of, with their length. */
    const short = new Map<string, number>();
    let bytesChecked = 0;
    const buffers = allocAligned(
      chunkBufferSize(manifests.values()),
      Math.min(CHECKS_IN_FLIGHT, Math.max(1, list.length)),
    );
    const hashes = new Sha256Threads(HASH_THREADS);
    let next = 0;
    try {
      await Promise.all(
        buffers.map(async (buffer) => {
          while (next < list.length) {
            signal?.throwIfAborted();
            const at = next++;
            const hash = list[at]!;
            try {
              const data = await this.loadChunk(hash, buffer, (d) => hashes.hash(d));
              if (data.length < sizes.get(hash)!) short.set(hash, data.length);
              bytesChecked += data.length;
              progress?.add(data.length);
            } catch (err) {
              if (!(err instanceof ChunkProblem)) {
                // verify fails with it: the other readers take no further chunk.
                next = list.length;
                throw err;
              }
              // A damaged chunk was checked too.
              bytesChecked += err.bytesRead;
              progress?.add(err.bytesRead);
              found.push({
                at,
                damage: { chunk: hash, problem: err.problem, breaks: [...(users.get(hash) ?? [])].sort() },
              });
            }
          }
        }),
      );
    } finally {
      await hashes.close();
    }
    const damaged = found.sort((a, b) => a.at - b.at).map((f) => f.damage);
    // A chunk whose hash matches but that a manifest names bytes beyond (a hand-edited manifest): restore
    // would refuse that backup, so verify must not pass it.
    if (short.size > 0)
      for (const [id, m] of manifests) {
        const past = m.extents.find(
          ([, length, hash, chunkOffset]) => chunkOffset + length > (short.get(hash) ?? Infinity),
        );
        if (past)
          damagedManifests.push({
            id,
            problem: `manifest ${id} is damaged: its extent at ${past[0]} reads past the end of chunk ${past[2]} (${short.get(past[2])} bytes)`,
          });
      }
    // With backups named, only what restoring them needs counts: their own manifests and their chains'.
    if (ids) {
      const needed = new Set<string>();
      for (const id of wanted)
        for (let next: string | null = id; next !== null && !needed.has(next); next = manifests.get(next)?.base ?? null)
          needed.add(next);
      damagedManifests.splice(0, damagedManifests.length, ...damagedManifests.filter((d) => needed.has(d.id)));
    }
    return { backups: wanted, chunksChecked: toCheck.size, bytesChecked, damaged, damagedManifests };
  }
}

async function isRegularFile(file: string): Promise<boolean> {
  return (await fs.promises.lstat(file).catch(() => undefined))?.isFile() === true;
}

/** The writer lock (repository-lock.ts); release() gives it up. */
export class RepositoryLock {
  held = true;
  constructor(private readonly unlock: () => void) {}
  async release(): Promise<void> {
    if (!this.held) return;
    this.held = false;
    this.unlock();
  }
}

/** Chunks verify reads and hashes at once. */
const CHECKS_IN_FLIGHT = 8;

/**
 * The buffer that holds any chunk of these backups (a chunk is at most its backup's block size), a whole
 * number of pages so it can be read with O_DIRECT; at most 64 MiB, so a manifest naming an absurd block size
 * cannot make a reader allocate it (a chunk larger than the buffer is reported damaged).
 */
export function chunkBufferSize(manifests: Iterable<Manifest>): number {
  let largest = 0;
  for (const m of manifests) largest = Math.max(largest, m.blockSize);
  return Math.min(64 << 20, Math.max(DIRECT_ALIGN, Math.ceil(largest / DIRECT_ALIGN) * DIRECT_ALIGN));
}

/** fsyncs of new chunk files (and, at the commit, of their directories) under way at once. */
const FSYNCS_IN_FLIGHT = 8;

/** A backup being written: chunks go in as they are read; commit() makes it exist. */
export class BackupWriter {
  readonly id: string;
  private readonly extents: ManifestExtent[] = [];
  private readonly touchedDirs = new Set<string>();
  private bytes = 0;
  /** Chunks stored but not yet deduplicated by a committed manifest: written by this backup. */
  private readonly written = new Set<string>();
  private readonly syncer = new ChunkSyncer();
  newChunks = 0;
  newBytes = 0;
  /** Chunks put, stored or not. */
  chunks = 0;
  /** Whether chunk files are written with O_DIRECT; cleared when the filesystem refuses it. */
  private direct = true;

  constructor(
    private readonly repo: BackupRepository,
    private readonly meta: Omit<Manifest, 'format' | 'id' | 'extents' | 'bytes' | 'created'>,
    private readonly known: Set<string>,
    /** How a chunk's name is computed: SHA-256, here or on the hashing threads. */
    private readonly hash: ChunkHasher,
  ) {
    const stamp = new Date().toISOString().replace(/[-:]/g, '');
    this.id = `${stamp}-${randomBytes(4).toString('hex')}`;
  }

  /** Stores `data` as the volume's bytes at `offset`: one extent, one chunk. */
  put(offset: number, data: Buffer): Promise<void> {
    return this.putChunk([{ offset, length: data.length }], data);
  }

  /**
   * Stores `data` as one chunk holding the volume's bytes of `extents`, back to back in that order (small
   * extents share a chunk, so an incremental of scattered blocks makes a file per chunk size, not per block).
   * Calls may run concurrently; commit() orders the extents.
   */
  async putChunk(extents: readonly Extent[], data: Buffer): Promise<void> {
    const hash = await this.hash(data);
    let at = 0;
    for (const e of extents) {
      this.extents.push([e.offset, e.length, hash, at]);
      at += e.length;
    }
    if (at !== data.length) throw new Error(`putChunk: the extents hold ${at} bytes, the chunk ${data.length}`);
    this.bytes += data.length;
    this.chunks++;
    if (this.known.has(hash) || this.written.has(hash)) return;
    this.written.add(hash);
    const final = this.repo.chunkPath(hash);
    const dir = path.dirname(final);
    if (!this.touchedDirs.has(dir)) {
      await mkdirPrivate(dir);
      this.touchedDirs.add(dir);
    }
    const temp = tempName(final, this.repo.tmpDir);
    this.direct = await createFile(temp, data, FILE_MODE, this.direct);
    // Not synced yet: the syncer makes it durable, at the latest in commit(), before the manifest names
    // it. Until then no manifest names it, so a crash leaves it as garbage, never as data (begin() trusts
    // only chunks of committed manifests).
    await fs.promises.rename(temp, final);
    this.syncer.add(final);
    this.newChunks++;
    this.newBytes += data.length;
  }

  /**
   * Removes what this backup stored, after it failed before its commit: its chunks, which no committed
   * manifest names (a failed backup on a full disk should not leave it full), and temp files. Holds the lock.
   */
  async abandon(): Promise<void> {
    // A commit that failed after its manifest's rename (at the directory's fsync) made the backup exist.
    if (fs.existsSync(path.join(this.repo.dir, 'backups', `${this.id}.json`))) return;
    await this.syncer.finish().catch(() => undefined);
    for (const hash of this.written) await fs.promises.rm(this.repo.chunkPath(hash), { force: true });
    await this.repo.removeTemps();
  }

  /** Makes the backup exist: new chunks and their directories made durable, then the manifest written durably. */
  async commit(): Promise<Manifest> {
    // Every new chunk file fsync'd; then the names renamed into each chunks/xx directory, and the xx
    // directories chunks/ may have got.
    await this.syncer.finish();
    if (this.touchedDirs.size > 0) {
      await eachLimited([...this.touchedDirs], FSYNCS_IN_FLIGHT, fsyncDir);
      await fsyncDir(path.join(this.repo.dir, 'chunks'));
    }
    this.extents.sort((a, b) => a[0] - b[0]);
    const manifest: Manifest = {
      format: MANIFEST_FORMAT,
      id: this.id,
      ...this.meta,
      extents: this.extents,
      bytes: this.bytes,
      created: new Date().toISOString(),
    };
    await writeFileDurably(
      path.join(this.repo.dir, 'backups', `${this.id}.json`),
      `${JSON.stringify(manifest)}\n`,
      this.repo.tmpDir,
    );
    return manifest;
  }
}

/**
 * fsyncs new chunk files in the background, FSYNCS_IN_FLIGHT at a time, while the backup still reads:
 * a chunk written with O_DIRECT is already on the disk, so its fsync only commits its metadata, and
 * concurrent fsyncs share journal commits. (A syncfs of the repository's filesystem, one call for many
 * files, also waits for every other writer's dirty data there: 0.3–7 s on a busy shared disk, against
 * 15–130 ms for 1 to 64 fsyncs of our own.)
 */
class ChunkSyncer {
  private readonly queue: string[] = [];
  private next = 0;
  private active = 0;
  private failure: unknown;
  private waiting: (() => void) | undefined;

  add(file: string): void {
    this.queue.push(file);
    this.pump();
  }

  /** Waits until every file added is fsync'd; throws if any fsync failed. */
  async finish(): Promise<void> {
    if (this.active > 0 || (this.next < this.queue.length && this.failure === undefined))
      await new Promise<void>((resolve) => {
        this.waiting = resolve;
      });
    if (this.failure !== undefined) throw this.failure;
  }

  private pump(): void {
    while (this.active < FSYNCS_IN_FLIGHT && this.next < this.queue.length && this.failure === undefined) {
      const file = this.queue[this.next++]!;
      this.active++;
      fsyncFile(file)
        .catch((err: unknown) => {
          this.failure ??= err;
        })
        .finally(() => {
          this.active--;
          this.pump();
          if (this.active === 0 && this.waiting) {
            this.waiting();
            this.waiting = undefined;
          }
        });
    }
  }
}

/** Runs `fn` on every item, `limit` at a time; rejects with the first failure once all have settled. */
async function eachLimited<T>(items: readonly T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  let failure: unknown;
  const worker = async (): Promise<void> => {
    while (next < items.length) {
      const item = items[next++]!;
      await fn(item).catch((err: unknown) => {
        failure ??= err;
      });
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  if (failure !== undefined) throw failure;
}
