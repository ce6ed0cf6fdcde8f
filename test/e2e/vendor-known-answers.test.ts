/**
 * Known answers through the real data plane (root, /dev/fuse, loop devices): `generate` writes each
 * pattern into a published block device (trims through BLKDISCARD), snapshots are cut through the
 * Controller, `check` compares the driver's allocated and delta answers over CSI, and a volume restored
 * from the snapshot, read through its own device, matches every recorded block's SHA-256.
 */
import fs from 'node:fs';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { appendAnswerRun, readAnswerRuns } from '../../src/vendor/answers.js';
import { checkAnswers } from '../../src/vendor/check.js';
import { csiMetadataReader, type MetadataReader } from '../../src/vendor/csi-metadata-reader.js';
import { generate, openPathTarget } from '../../src/vendor/generate.js';
import { PATTERNS } from '../../src/vendor/patterns.js';
import { MiB, blockCap, dataPlaneSuite, startNodeEnv, type NodeEnv } from './support/node-env.js';

const CAPACITY = 32 * MiB;

let env: NodeEnv;
let reader: MetadataReader;
let names = 0;

interface Published {
  volumeId: string;
  staging: string;
  target: string;
}

async function createBlockVolume(snapshotId?: string): Promise<string> {
  const res = await env.controller.call('createVolume', {
    name: `ka-${++names}`,
    capacityRange: { requiredBytes: BigInt(CAPACITY) },
    volumeCapabilities: [blockCap()],
    ...(snapshotId ? { volumeContentSource: { type: { case: 'snapshot' as const, value: { snapshotId } } } } : {}),
  });
  return res.volume!.volumeId;
}

async function publish(volumeId: string): Promise<Published> {
  const name = `p${++names}`;
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

async function release(p: Published): Promise<void> {
  await env.node.call('nodeUnpublishVolume', { volumeId: p.volumeId, targetPath: p.target });
  await env.node.call('nodeUnstageVolume', { volumeId: p.volumeId, stagingTargetPath: p.staging });
}

async function snapshot(volumeId: string): Promise<string> {
  await new Promise((r) => setTimeout(r, 2));
  return (await env.controller.call('createSnapshot', { name: `ka-snap-${++names}`, sourceVolumeId: volumeId }))
    .snapshot!.snapshotId;
}

async function writePattern(
  device: string,
  file: string,
  pattern: (typeof PATTERNS)[number],
  seed: number,
  count: number,
): Promise<void> {
  const target = await openPathTarget(device);
  try {
    appendAnswerRun(file, await generate({ pattern, seed, count, blockSize: 4096 }, target));
  } finally {
    await target.close();
  }
}

dataPlaneSuite('known answers through a published block device', () => {
  beforeAll(async () => {
    env = await startNodeEnv();
    reader = csiMetadataReader(env.target);
  }, 60_000);
  afterAll(async () => {
    reader?.close();
    await env?.cleanup();
  }, 60_000);

  for (const pattern of PATTERNS) {
    it(`${pattern}: the driver's allocated and delta answers and a restored device match the answers`, async () => {
      const file = env.path(`answers-${pattern}.jsonl`);
      const source = await publish(await createBlockVolume());
      await writePattern(source.target, file, 'random', 100, 200);
      const s1 = await snapshot(source.volumeId);
      await writePattern(source.target, file, pattern, 200, 150);
      const s2 = await snapshot(source.volumeId);
      await release(source);
      const restored = await publish(await createBlockVolume(s2));
      const handle = await fs.promises.open(restored.target, 'r');
      try {
        const runs = readAnswerRuns(file);
        const s1At = await reader.snapshotCreatedAtMs(s1);
        const s2At = await reader.snapshotCreatedAtMs(s2);
        const allocated = await checkAnswers({
          runs,
          snapshotCreatedAtMs: s1At,
          reported: (await reader.extents(s1, undefined)).extents,
          granularity: 0,
        });
        expect(allocated).toMatchObject({ ok: true, runsUsed: [0], missing: [], extraNotAllowed: [] });
        const delta = await checkAnswers({
          runs,
          snapshotCreatedAtMs: s2At,
          baseCreatedAtMs: s1At,
          reported: (await reader.extents(s2, s1)).extents,
          granularity: 0,
          readRestored: async (offset, length) => {
            const buf = Buffer.alloc(length);
            await handle.read(buf, 0, length, offset);
            return buf;
          },
        });
        expect(delta).toMatchObject({
          ok: true,
          runsUsed: [1],
          missing: [],
          extraNotAllowed: [],
          checksumMismatches: [],
        });
        expect(delta.blocksCompared).toBeGreaterThan(0);
      } finally {
        await handle.close();
        await release(restored);
      }
    }, 120_000);
  }
});
