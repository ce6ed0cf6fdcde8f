/**
 * Filesystem volume end to end (issue 4): the node makes the filesystem (ext4 by default, xfs when
 * asked), a pod writes files through the published mount and fsyncs them, the Controller cuts a snapshot,
 * and a volume restored from it, staged and published on the same node, holds identical files; what was
 * written after the snapshot is not in it.
 */
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { MiB, dataPlaneSuite, mountAt, mountCap, startNodeEnv, type NodeEnv } from './support/node-env.js';

let env: NodeEnv;

interface Published {
  volumeId: string;
  staging: string;
  target: string;
}

async function stageAndPublish(volumeId: string, name: string, fsType: string): Promise<Published> {
  const staging = env.path('staging', name);
  const target = env.path('pods', name);
  fs.mkdirSync(staging, { recursive: true });
  fs.mkdirSync(env.path('pods'), { recursive: true });
  await env.node.call('nodeStageVolume', { volumeId, stagingTargetPath: staging, volumeCapability: mountCap(fsType) });
  await env.node.call('nodePublishVolume', {
    volumeId,
    stagingTargetPath: staging,
    targetPath: target,
    volumeCapability: mountCap(fsType),
  });
  return { volumeId, staging, target };
}

async function release(p: Published): Promise<void> {
  await env.node.call('nodeUnpublishVolume', { volumeId: p.volumeId, targetPath: p.target });
  await env.node.call('nodeUnstageVolume', { volumeId: p.volumeId, stagingTargetPath: p.staging });
}

/** Writes a file and fsyncs it, and its directory, as a careful application does. */
function writeDurably(file: string, data: Buffer): void {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  const fd = fs.openSync(file, 'w');
  fs.writeSync(fd, data);
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  const dir = fs.openSync(path.dirname(file), 'r');
  fs.fsyncSync(dir);
  fs.closeSync(dir);
}

/** Relative path -> sha256 of every regular file under `root` (lost+found aside). */
function digest(root: string): Map<string, string> {
  const out = new Map<string, string>();
  const walk = (dir: string) => {
    for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
      const full = path.join(dir, entry.name);
      if (entry.isDirectory()) {
        if (entry.name !== 'lost+found') walk(full);
      } else out.set(path.relative(root, full), createHash('sha256').update(fs.readFileSync(full)).digest('hex'));
    }
  };
  walk(root);
  return out;
}

dataPlaneSuite('filesystem volume end to end: files survive snapshot and restore', () => {
  beforeAll(async () => {
    env = await startNodeEnv();
  }, 60_000);
  afterAll(async () => {
    await env?.cleanup();
  }, 60_000);

  for (const [fsType, label] of [
    ['', 'ext4 (the default)'],
    ['xfs', 'xfs'],
  ] as const) {
    it(`${label}: files written and fsynced before a snapshot are identical in a restored volume; later writes are not in it`, async () => {
      const expectedType = fsType || 'ext4';
      // xfs needs at least 300 MB.
      const capacity = 320 * MiB;
      const vol = await env.controller.call('createVolume', {
        name: `fs-${expectedType}`,
        capacityRange: { requiredBytes: BigInt(capacity) },
        volumeCapabilities: [mountCap(fsType)],
      });
      const source = await stageAndPublish(vol.volume!.volumeId, `source-${expectedType}`, fsType);
      expect(mountAt(source.staging)?.fsType).toBe(expectedType);

      const files: [string, Buffer][] = [
        ['small.txt', Buffer.from('hello, changed block tracking\n')],
        ['empty', Buffer.alloc(0)],
        ['dir/a.bin', randomBytes(3 * MiB + 123)],
        ['dir/nested/b.bin', randomBytes(200 * 1024)],
        ...Array.from({ length: 20 }, (_, i) => [`many/f${i}`, randomBytes(1 + i * 997)] as [string, Buffer]),
      ];
      for (const [name, data] of files) writeDurably(path.join(source.target, name), data);
      const before = digest(source.target);
      expect(before.size).toBe(files.length);

      const snap = await env.controller.call('createSnapshot', {
        sourceVolumeId: source.volumeId,
        name: `fs-snap-${expectedType}`,
      });
      // After the cut: a new file and a changed one, which the restore must not see.
      writeDurably(path.join(source.target, 'after.txt'), Buffer.from('written after the snapshot'));
      writeDurably(path.join(source.target, 'small.txt'), Buffer.from('changed after the snapshot'));

      const restored = await env.controller.call('createVolume', {
        name: `fs-restore-${expectedType}`,
        capacityRange: { requiredBytes: BigInt(capacity) },
        volumeCapabilities: [mountCap(fsType)],
        volumeContentSource: { type: { case: 'snapshot', value: { snapshotId: snap.snapshot!.snapshotId } } },
      });
      const copy = await stageAndPublish(restored.volume!.volumeId, `restore-${expectedType}`, fsType);
      expect(mountAt(copy.staging)?.fsType).toBe(expectedType);
      expect(digest(copy.target)).toEqual(before);
      // The restore is its own filesystem: writing to it leaves the source alone.
      writeDurably(path.join(copy.target, 'only-in-copy'), Buffer.from('x'));
      expect(fs.existsSync(path.join(source.target, 'only-in-copy'))).toBe(false);

      await release(copy);
      await release(source);
    }, 300_000);
  }
});
