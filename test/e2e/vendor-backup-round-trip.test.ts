/**
 * The vendor's loop on the bench, for every pattern (root, /dev/fuse, loop devices): generate into a
 * published block device, snapshot, back up with the backup toolkit (full, then incremental over the
 * client's delta), restore into a plain image file, and check: the driver's allocated and delta answers
 * and every recorded block of the restored file hold. A restore that is wrong in one block fails the
 * check with that block named; `cbt-csi check` then exits 1 and prints the block.
 */
import fs from 'node:fs';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { BackupRepository } from '../../src/backup/repository.js';
import { openSource } from '../../src/backup/block-target.js';
import { planBackup, writeBackup } from '../../src/backup/backup-run.js';
import { createProgress } from '../../src/backup/progress.js';
import { restoreBackup } from '../../src/backup/restore.js';
import { connectCsiDirect, type SnapshotMetadataClient } from '../../src/client/index.js';
import { appendAnswerRun, readAnswerRuns } from '../../src/vendor/answers.js';
import { checkAnswers } from '../../src/vendor/check.js';
import { csiMetadataReader, type MetadataReader } from '../../src/vendor/csi-metadata-reader.js';
import { generate, openPathTarget } from '../../src/vendor/generate.js';
import { PATTERNS, type PatternName } from '../../src/vendor/patterns.js';
import { runCli } from '../backup/support/cli.js';
import { MiB, blockCap, dataPlaneSuite, startNodeEnv, type NodeEnv } from './support/node-env.js';

const CAPACITY = 32 * MiB;
const BLOCK = 4096;

let env: NodeEnv;
let reader: MetadataReader;
let client: SnapshotMetadataClient;
let names = 0;

async function publishNewVolume(): Promise<{ volumeId: string; staging: string; target: string }> {
  const name = `rt${++names}`;
  const volumeId = (
    await env.controller.call('createVolume', {
      name,
      capacityRange: { requiredBytes: BigInt(CAPACITY) },
      volumeCapabilities: [blockCap()],
    })
  ).volume!.volumeId;
  const staging = env.path('staging', name);
  const target = env.path('pods', name);
  fs.mkdirSync(staging, { recursive: true });
  fs.mkdirSync(env.path('pods'), { recursive: true });
  await env.node.call('nodeStageVolume', { volumeId, stagingTargetPath: staging, volumeCapability: blockCap() });
  await env.node.call('nodePublishVolume', {
    volumeId,
    stagingTargetPath: staging,
    targetPath: target,
    volumeCapability: blockCap(),
  });
  return { volumeId, staging, target };
}

async function snapshot(volumeId: string): Promise<string> {
  await new Promise((r) => setTimeout(r, 2)); // the cut comes after the run's (millisecond) finish time
  return (await env.controller.call('createSnapshot', { name: `rt-snap-${++names}`, sourceVolumeId: volumeId }))
    .snapshot!.snapshotId;
}

async function writePattern(device: string, answers: string, pattern: PatternName, seed: number, count: number) {
  const target = await openPathTarget(device);
  try {
    appendAnswerRun(answers, await generate({ pattern, seed, count, blockSize: BLOCK }, target));
  } finally {
    await target.close();
  }
}

/** A backup of `snapshot`, read from `device` (which holds exactly the snapshot now), as `backup --source`. */
async function backUp(repo: BackupRepository, snapshotId: string, volumeId: string, device: string, baseId?: string) {
  const base = baseId ? await repo.manifest(baseId) : null;
  const plan = await planBackup(client, snapshotId, volumeId, base);
  const source = await openSource(device, plan.capacityBytes);
  const lock = await repo.lock();
  try {
    return await writeBackup(repo, lock, plan, source, createProgress('quiet'));
  } finally {
    await lock.release();
    await source.close();
  }
}

function readFile(file: string) {
  return async (offset: number, length: number) => {
    const handle = await fs.promises.open(file, 'r');
    try {
      const buf = Buffer.alloc(length);
      await handle.read(buf, 0, length, offset);
      return buf;
    } finally {
      await handle.close();
    }
  };
}

dataPlaneSuite('vendor round trip: generate, snapshot, backup, restore to a plain file, check', () => {
  beforeAll(async () => {
    env = await startNodeEnv();
    reader = csiMetadataReader(env.target);
    client = connectCsiDirect(env.target);
  }, 60_000);
  afterAll(async () => {
    reader?.close();
    await client?.close();
    await env?.cleanup();
  }, 60_000);

  for (const pattern of PATTERNS) {
    it(`${pattern}: backups restored into a plain file match the answers; one wrong block is named`, async () => {
      const answers = env.path(`answers-${pattern}.jsonl`);
      const repo = await BackupRepository.openOrCreate(env.path(`repo-${pattern}`));
      const volume = await publishNewVolume();
      await writePattern(volume.target, answers, 'random', 10, 200);
      const s1 = await snapshot(volume.volumeId);
      const full = await backUp(repo, s1, volume.volumeId, volume.target);
      await writePattern(volume.target, answers, pattern, 20, 150);
      const s2 = await snapshot(volume.volumeId);
      const incremental = await backUp(repo, s2, volume.volumeId, volume.target, full.id);
      expect(incremental).toMatchObject({ kind: 'incremental', base: full.id });
      await env.node.call('nodeUnpublishVolume', { volumeId: volume.volumeId, targetPath: volume.target });
      await env.node.call('nodeUnstageVolume', { volumeId: volume.volumeId, stagingTargetPath: volume.staging });

      const restored = env.path(`restored-${pattern}.img`);
      await restoreBackup(repo, incremental.id, restored, createProgress('quiet'));
      expect(fs.statSync(restored).isFile()).toBe(true);

      const runs = readAnswerRuns(answers);
      const s1At = await reader.snapshotCreatedAtMs(s1);
      const s2At = await reader.snapshotCreatedAtMs(s2);
      const delta = await checkAnswers({
        runs,
        snapshotCreatedAtMs: s2At,
        baseCreatedAtMs: s1At,
        reported: (await reader.extents(s2, s1)).extents,
        granularity: 0,
      });
      expect(delta).toMatchObject({ ok: true, runsUsed: [1], missing: [], extraNotAllowed: [] });
      const allocated = await checkAnswers({
        runs,
        snapshotCreatedAtMs: s2At,
        reported: (await reader.extents(s2, undefined)).extents,
        granularity: 0,
        readRestored: readFile(restored),
      });
      expect(allocated).toMatchObject({ ok: true, runsUsed: [0, 1], missing: [], checksumMismatches: [] });
      expect(allocated.blocksCompared).toBeGreaterThan(0);

      // A restore wrong in one block the pattern changed: check fails and names exactly that block.
      const wrong = runs[1]!.changed[0]![0];
      const fd = fs.openSync(restored, 'r+');
      fs.writeSync(fd, Buffer.from('X'), 0, 1, wrong + 100);
      fs.closeSync(fd);
      const bad = await checkAnswers({
        runs,
        snapshotCreatedAtMs: s2At,
        granularity: 0,
        readRestored: readFile(restored),
      });
      expect(bad).toMatchObject({ ok: false, checksumMismatches: [wrong] });

      if (pattern === 'trim') {
        // What the vendor sees: exit status 1 and the block named.
        const res = await runCli([
          'check',
          '--endpoint',
          env.target,
          '--answers',
          answers,
          '--snapshot',
          s2,
          '--restored',
          restored,
        ]);
        expect(res.code).toBe(1);
        expect(res.stdout).toContain(`checksum mismatch: block ${wrong / BLOCK} (bytes [${wrong}, +${BLOCK}))`);
        expect(res.stdout).toMatch(/missing: none\n/);
        expect(res.stdout).toMatch(/FAILED\n$/);
      }
    }, 180_000);
  }
});
