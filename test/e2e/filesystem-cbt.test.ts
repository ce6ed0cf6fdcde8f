/**
 * Changed block tracking of filesystem volumes, end to end (issue 11 §4). Kubernetes' alpha/beta limits
 * CBT to block volumes; this driver tracks every block of a filesystem volume too, and this test shows
 * that what it reports is what a backup needs:
 *
 *  - an ext4 and an xfs volume are created and published as a mount through the Node service, as kubelet
 *    does; files are written and fsync'd (new files, appends, overwrites in place, a delete) between two
 *    snapshots, each taken with the filesystem frozen (fsfreeze), as a careful backup tool does; a third
 *    snapshot is taken unfrozen, as a plain VolumeSnapshot is (crash-consistent);
 *  - the snapshots are restored (CreateVolume from snapshot) and published as raw block devices; a
 *    block-level diff of two restored images must be covered by GetMetadataDelta: no changed block may be
 *    missing;
 *  - the delta may hold more than the diff only where the driver's granularity explains it: a block the
 *    filesystem rewrote with the bytes it already had (journal, bitmaps, inode tables, directories). The
 *    filesystems' own tools (dumpe2fs/debugfs, xfs_db) say what every extra block is; file data of files
 *    left alone is in neither the diff nor the delta;
 *  - GetMetadataAllocated of each snapshot covers every nonzero block of its image;
 *  - mounted (the unfrozen one after its journal is replayed), the restored volumes hold exactly the files
 *    as they were at their snapshot.
 *
 * What a backup client can and cannot do with this is in docs/filesystem-volumes.md.
 */
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { type BlockRole, type FsBlockOwner, blockOwners } from './support/fs-block-owners.js';
import { needsJournalReplay } from './support/fs-journal.js';
import {
  MiB,
  blockCap,
  dataPlaneSuite,
  mountAt,
  mountCap,
  sh,
  startNodeEnv,
  type NodeEnv,
} from './support/node-env.js';

/** The driver's block size (its default): the unit of the delta and of the diff below. */
const BLOCK = 4096;
/** xfs needs at least 300 MB; ext4 gets the same (it then uses 1 KiB filesystem blocks). */
const CAPACITY = 320 * MiB;

let env: NodeEnv;

interface Published {
  volumeId: string;
  staging: string;
  target: string;
  cap: ReturnType<typeof mountCap> | ReturnType<typeof blockCap>;
}

async function publish(volumeId: string, name: string, cap: Published['cap']): Promise<Published> {
  const staging = env.path('staging', name);
  const target = env.path('pods', name);
  fs.mkdirSync(staging, { recursive: true });
  fs.mkdirSync(env.path('pods'), { recursive: true });
  await env.node.call('nodeStageVolume', { volumeId, stagingTargetPath: staging, volumeCapability: cap });
  await env.node.call('nodePublishVolume', {
    volumeId,
    stagingTargetPath: staging,
    targetPath: target,
    volumeCapability: cap,
  });
  return { volumeId, staging, target, cap };
}

async function release(p: Published): Promise<void> {
  await env.node.call('nodeUnpublishVolume', { volumeId: p.volumeId, targetPath: p.target });
  await env.node.call('nodeUnstageVolume', { volumeId: p.volumeId, stagingTargetPath: p.staging });
}

// ---------------------------------------------------------------- what the application does

/** The files as the application last wrote them: relative path -> content. */
type Files = Map<string, Buffer>;

function fsyncDir(dir: string): void {
  const fd = fs.openSync(dir, 'r');
  fs.fsyncSync(fd);
  fs.closeSync(fd);
}

function createFile(root: string, files: Files, name: string, data: Buffer): void {
  const file = path.join(root, name);
  fs.mkdirSync(path.dirname(file), { recursive: true });
  const fd = fs.openSync(file, 'w');
  fs.writeSync(fd, data);
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  fsyncDir(path.dirname(file));
  files.set(name, Buffer.from(data));
}

function appendFile(root: string, files: Files, name: string, data: Buffer): void {
  const fd = fs.openSync(path.join(root, name), 'a');
  fs.writeSync(fd, data);
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  files.set(name, Buffer.concat([files.get(name)!, data]));
}

/** Rewrites bytes inside an existing file (no truncation, no new blocks). */
function overwriteInPlace(root: string, files: Files, name: string, offset: number, data: Buffer): void {
  const fd = fs.openSync(path.join(root, name), 'r+');
  fs.writeSync(fd, data, 0, data.length, offset);
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  data.copy(files.get(name)!, offset);
}

function deleteFile(root: string, files: Files, name: string): void {
  fs.unlinkSync(path.join(root, name));
  fsyncDir(path.dirname(path.join(root, name)));
  files.delete(name);
}

/** Relative path -> sha256 of every regular file under `root` (lost+found aside). */
function digestTree(root: string): Map<string, string> {
  const out = new Map<string, string>();
  const walk = (dir: string) => {
    for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
      const full = path.join(dir, entry.name);
      if (entry.isDirectory()) {
        if (entry.name !== 'lost+found') walk(full);
      } else out.set(path.relative(root, full), sha256(fs.readFileSync(full)));
    }
  };
  walk(root);
  return out;
}

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const digestFiles = (files: Files) => new Map([...files].map(([n, d]) => [n, sha256(d)]));

/**
 * Cuts a snapshot with the filesystem frozen: fsfreeze flushes it and holds new writes, so the image is a
 * clean filesystem (journal checkpointed) rather than a crash-consistent one.
 */
async function frozenSnapshot(p: Published, name: string): Promise<string> {
  sh('fsfreeze', ['--freeze', p.target]);
  try {
    const res = await env.controller.call('createSnapshot', { sourceVolumeId: p.volumeId, name });
    return res.snapshot!.snapshotId;
  } finally {
    sh('fsfreeze', ['--unfreeze', p.target]);
  }
}

// ---------------------------------------------------------------- what the backup client sees

type Extent = { offset: number; length: number };

function blocksOf(extents: readonly Extent[]): Set<number> {
  const out = new Set<number>();
  for (const e of extents) for (let b = e.offset / BLOCK; b < (e.offset + e.length) / BLOCK; b++) out.add(b);
  return out;
}

async function deltaBlocks(baseSnapshotId: string, targetSnapshotId: string): Promise<Set<number>> {
  const messages = await env.metadata.collect('getMetadataDelta', { baseSnapshotId, targetSnapshotId });
  return blocksOf(
    messages.flatMap((m) =>
      m.blockMetadata.map((t) => ({ offset: Number(t.byteOffset), length: Number(t.sizeBytes) })),
    ),
  );
}

async function allocatedBlocks(snapshotId: string): Promise<Set<number>> {
  const messages = await env.metadata.collect('getMetadataAllocated', { snapshotId });
  return blocksOf(
    messages.flatMap((m) =>
      m.blockMetadata.map((t) => ({ offset: Number(t.byteOffset), length: Number(t.sizeBytes) })),
    ),
  );
}

const SECTOR = 512;

interface ImageComparison {
  /** Driver blocks whose bytes differ. */
  differ: Set<number>;
  /** 512-byte sectors whose bytes differ: finer than any filesystem block, so it says which of those changed. */
  differingSectors: number[];
  nonzeroA: Set<number>;
  nonzeroB: Set<number>;
}

/** Reads two devices side by side: what differs between them, and each one's nonzero blocks. */
function compareImages(a: string, b: string): ImageComparison {
  const out: ImageComparison = { differ: new Set(), differingSectors: [], nonzeroA: new Set(), nonzeroB: new Set() };
  const zero = Buffer.alloc(BLOCK);
  const chunk = 4 * MiB;
  const bufA = Buffer.alloc(chunk);
  const bufB = Buffer.alloc(chunk);
  const fdA = fs.openSync(a, 'r');
  const fdB = fs.openSync(b, 'r');
  try {
    for (let pos = 0; pos < CAPACITY; pos += chunk) {
      const n = Math.min(chunk, CAPACITY - pos);
      for (const [fd, buf] of [
        [fdA, bufA],
        [fdB, bufB],
      ] as const) {
        let got = 0;
        while (got < n) {
          const r = fs.readSync(fd, buf, got, n - got, pos + got);
          if (r === 0) throw new Error(`short read of ${a} or ${b} at ${pos + got}`);
          got += r;
        }
      }
      for (let off = 0; off < n; off += BLOCK) {
        const block = (pos + off) / BLOCK;
        const x = bufA.subarray(off, off + BLOCK);
        const y = bufB.subarray(off, off + BLOCK);
        if (!x.equals(zero)) out.nonzeroA.add(block);
        if (!y.equals(zero)) out.nonzeroB.add(block);
        if (x.equals(y)) continue;
        out.differ.add(block);
        for (let s = 0; s < BLOCK; s += SECTOR) {
          if (!x.subarray(s, s + SECTOR).equals(y.subarray(s, s + SECTOR)))
            out.differingSectors.push((pos + off + s) / SECTOR);
        }
      }
    }
  } finally {
    fs.closeSync(fdA);
    fs.closeSync(fdB);
  }
  return out;
}

const sorted = (s: Iterable<number>) => [...s].sort((x, y) => x - y);
const minus = (a: Set<number>, b: Set<number>) => sorted([...a].filter((x) => !b.has(x)));

/** "role: what ×count" lines (counting filesystem blocks), most frequent first. */
function summarize(owners: Iterable<FsBlockOwner>): string[] {
  const counts = new Map<string, number>();
  for (const o of owners) {
    const key = `${o.role}: ${o.what}`;
    counts.set(key, (counts.get(key) ?? 0) + 1);
  }
  return [...counts].sort((x, y) => y[1] - x[1]).map(([k, n]) => `${k} ×${n}`);
}

/** Roles of structures a filesystem rewrites by itself, possibly with the bytes they already held. */
const SELF_REWRITTEN: readonly BlockRole[] = ['journal', 'metadata', 'directory'];

const fileOf = (o: FsBlockOwner) => (o.role === 'file data' ? o.what.replace(/^\/+/, '') : undefined);

// ---------------------------------------------------------------- the test

dataPlaneSuite('filesystem volumes: changed block tracking end to end', () => {
  beforeAll(async () => {
    env = await startNodeEnv();
  }, 60_000);
  afterAll(async () => {
    await env?.cleanup();
  }, 60_000);

  for (const fsType of ['ext4', 'xfs'] as const) {
    it(`${fsType}: the delta between two snapshots (frozen or not) covers every block that differs between their restored images; extra blocks are filesystem metadata or journal; allocated covers every nonzero block`, async () => {
      const vol = await env.controller.call('createVolume', {
        name: `fscbt-${fsType}`,
        capacityRange: { requiredBytes: BigInt(CAPACITY) },
        volumeCapabilities: [mountCap(fsType)],
      });
      const source = await publish(vol.volume!.volumeId, `source-${fsType}`, mountCap(fsType));
      expect(mountAt(source.staging)?.fsType).toBe(fsType);
      const root = source.target;

      // Before snapshot 1: files some of which change later, and some that never do.
      const files: Files = new Map();
      const untouched = new Set([
        'keep/photo.bin',
        'keep/notes.txt',
        ...Array.from({ length: 12 }, (_, i) => `many/f${i}`),
      ]);
      createFile(root, files, 'keep/photo.bin', randomBytes(2 * MiB + 1234));
      createFile(root, files, 'keep/notes.txt', Buffer.from('never changes\n'.repeat(300)));
      for (let i = 0; i < 12; i++) createFile(root, files, `many/f${i}`, randomBytes(1 + i * 1499));
      createFile(root, files, 'log/app.log', randomBytes(100 * 1024 + 77));
      createFile(root, files, 'db/table.bin', randomBytes(1 * MiB));
      createFile(root, files, 'tmp/scratch.bin', randomBytes(512 * 1024));
      const snap1 = await frozenSnapshot(source, `fscbt-${fsType}-1`);
      const files1 = digestFiles(files);

      // Between the snapshots: every kind of change an application makes, each fsync'd.
      const changedFiles = ['new/upload.bin', 'new/small.txt', 'log/app.log', 'db/table.bin'];
      createFile(root, files, 'new/upload.bin', randomBytes(1.5 * MiB));
      createFile(root, files, 'new/small.txt', Buffer.from('a small new file\n'));
      appendFile(root, files, 'log/app.log', randomBytes(37 * 1024 + 5));
      overwriteInPlace(root, files, 'db/table.bin', 0, randomBytes(4096));
      overwriteInPlace(root, files, 'db/table.bin', 10 * 4096 + 100, randomBytes(5000));
      overwriteInPlace(root, files, 'db/table.bin', 512 * 1024, randomBytes(64 * 1024));
      deleteFile(root, files, 'tmp/scratch.bin');
      const snap2 = await frozenSnapshot(source, `fscbt-${fsType}-2`);
      const files2 = digestFiles(files);
      // Snapshot 3 without freezing, as a plain VolumeSnapshot is taken: crash-consistent. The fsync'd
      // writes before it are in it (some only in the journal until a mount replays it).
      createFile(root, files, 'new/after-2.bin', randomBytes(300 * 1024));
      overwriteInPlace(root, files, 'db/table.bin', 200 * 1024, randomBytes(8192));
      const snap3 = (
        await env.controller.call('createSnapshot', { sourceVolumeId: source.volumeId, name: `fscbt-${fsType}-3` })
      ).snapshot!.snapshotId;
      const files3 = digestFiles(files);
      // After the last snapshot: must not show in any.
      createFile(root, files, 'later.txt', Buffer.from('after the last snapshot'));

      const snaps = [snap1, snap2, snap3];
      const restores: Published[] = [];
      for (const [i, snapshotId] of snaps.entries()) {
        const restored = await env.controller.call('createVolume', {
          name: `fscbt-${fsType}-restore-${i + 1}`,
          capacityRange: { requiredBytes: BigInt(CAPACITY) },
          volumeCapabilities: [blockCap()],
          volumeContentSource: { type: { case: 'snapshot', value: { snapshotId } } },
        });
        restores.push(await publish(restored.volume!.volumeId, `restore-${fsType}-${i + 1}`, blockCap()));
      }
      const [image1, image2, image3] = restores as [Published, Published, Published];

      // The raw images as restored, before anything mounts them.
      const cmp = compareImages(image1.target, image2.target);
      const cmp23 = compareImages(image2.target, image3.target);
      const delta = await deltaBlocks(snap1, snap2);
      const delta23 = await deltaBlocks(snap2, snap3);
      const allocated = await Promise.all(snaps.map(allocatedBlocks));

      // Invariant 1, through a real filesystem: no block that differs is missing from the delta.
      expect(minus(cmp.differ, delta), 'blocks that differ between restores 1 and 2, missing from the delta').toEqual(
        [],
      );
      expect(
        minus(cmp23.differ, delta23),
        'blocks that differ between restores 2 and 3, missing from the delta',
      ).toEqual([]);
      const nonzero = [cmp.nonzeroA, cmp.nonzeroB, cmp23.nonzeroB];
      for (const [i, blocks] of nonzero.entries()) {
        expect(minus(blocks, allocated[i]!), `nonzero blocks of snapshot ${i + 1} missing from its allocated`).toEqual(
          [],
        );
      }
      // A frozen ext4 is clean (its journal checkpointed); an unfrozen snapshot of a mounted filesystem is
      // not, whichever the filesystem. (A frozen xfs still leaves its log to replay on this kernel; see the
      // report line.)
      const replay = restores.map((r) => needsJournalReplay(r.target, fsType));
      if (fsType === 'ext4') expect(replay[0], 'frozen ext4 snapshot needs journal replay').toBe(false);
      expect(replay[2], 'unfrozen snapshot needs journal replay').toBe(true);
      // Not trivially empty: at least the new data (1.5 MiB, appends, overwrites) differs.
      expect(cmp.differ.size).toBeGreaterThanOrEqual((1.5 * MiB + 37 * 1024 + 64 * 1024) / BLOCK);
      expect(cmp23.differ.size).toBeGreaterThanOrEqual((300 * 1024 + 8192) / BLOCK);

      // Mounted, each restore holds the files as they were at its snapshot, and not what came after. The
      // mount replays the journal (snapshot 3 needs it; a frozen xfs too leaves its log to replay), which
      // the filesystems' tools need before they read an image (below).
      for (const [i, image] of restores.entries()) {
        await release(image);
        const mounted = await publish(image.volumeId, `restore-${fsType}-${i + 1}-fs`, mountCap(fsType));
        expect(digestTree(mounted.target), `files of the volume restored from snapshot ${i + 1}`).toEqual(
          [files1, files2, files3][i],
        );
        await release(mounted);
      }

      // What the changed and the extra blocks hold, by the filesystem's own account (image 2).
      const extra = minus(delta, cmp.differ);
      const inspected = await publish(image2.volumeId, `restore-${fsType}-2-inspect`, blockCap());
      const { fsBlockSize, owners } = blockOwners(inspected.target, fsType, [...sorted(cmp.differ), ...extra], BLOCK);
      await release(inspected);
      // A filesystem block changed when one of its sectors did.
      const changedFsBlocks = new Set(cmp.differingSectors.map((s) => Math.floor((s * SECTOR) / fsBlockSize)));
      const allOwners = [...owners.values()].flat();
      const changedOwners = allOwners.filter((o) => changedFsBlocks.has(o.fsBlock));
      const filesChanged = new Set(changedOwners.map(fileOf).filter((f) => f !== undefined));
      for (const f of changedFiles) {
        expect(filesChanged.has(f), `data of ${f}, written between the snapshots, is among the changed blocks`).toBe(
          true,
        );
      }
      expect(
        [...filesChanged].filter((f) => untouched.has(f)),
        'files left alone between the snapshots have no changed block',
      ).toEqual([]);
      // An extra block is one the filesystem rewrote with the bytes it had: it must hold such a structure.
      const extraOwners = extra.flatMap((b) => owners.get(b)!);
      const unexplained = extra.filter((b) => !owners.get(b)!.some((o) => SELF_REWRITTEN.includes(o.role)));
      expect(
        unexplained.map((b) => `driver block ${b}: ${JSON.stringify(owners.get(b))}`),
        'extra delta blocks holding no journal, metadata or directory block',
      ).toEqual([]);

      console.log(
        [
          `${fsType} (${fsBlockSize}-byte filesystem blocks, ${BLOCK}-byte driver blocks): ${cmp.differ.size} driver ` +
            `blocks differ between the restored images; the delta has ${delta.size} (${extra.length} extra: ` +
            `rewritten with the same bytes); allocated ${allocated.map((a) => a.size).join(', ')} blocks; ` +
            `unfrozen snapshot 3: ${cmp23.differ.size} differ from 2, delta ${delta23.size}; ` +
            `journal replay needed by the images: ${replay.join(', ')}`,
          '  filesystem blocks that changed:',
          ...summarize(changedOwners).map((l) => `    ${l}`),
          '  filesystem blocks in the extra driver blocks:',
          ...summarize(extraOwners).map((l) => `    ${l}`),
        ].join('\n'),
      );
      await release(source);
    }, 600_000);
  }
}, ['fsfreeze', 'dumpe2fs', 'debugfs', 'xfs_db']);
