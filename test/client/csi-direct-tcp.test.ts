/**
 * `--endpoint tcp://HOST:PORT`, which the toolkit's help and the client's docs offer beside unix sockets:
 * the client lists a snapshot over it, and `cbt-csi backup` and `metadata` work against a driver listening
 * on loopback TCP.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connectCsiDirect } from '../../src/client/index.js';
import { freePort } from '../support/free-port.js';
import { startTestDriver, type TestDriver } from '../support/test-driver.js';
import { MiB, blockCap } from '../e2e/support/node-env.js';
import { jsonOf, runCli } from '../backup/support/cli.js';

describe('CSI-direct over tcp://127.0.0.1:PORT', () => {
  let t: TestDriver;
  let endpoint: string;
  let snap: string;

  beforeAll(async () => {
    const port = await freePort();
    endpoint = `tcp://127.0.0.1:${port}`;
    t = await startTestDriver({ endpoint: { kind: 'tcp', host: '127.0.0.1', port } });
    const v = (
      await t.controller.call('createVolume', {
        name: 'tcp',
        capacityRange: { requiredBytes: BigInt(8 * MiB) },
        volumeCapabilities: [blockCap()],
      })
    ).volume!;
    snap = (await t.controller.call('createSnapshot', { sourceVolumeId: v.volumeId, name: 'tcp-1' })).snapshot!
      .snapshotId;
    fs.writeFileSync(path.join(t.dir, 'zeros.img'), Buffer.alloc(8 * MiB));
  });
  afterAll(async () => {
    await t?.stop();
  });

  it('the client lists a snapshot', async () => {
    const client = connectCsiDirect(endpoint);
    try {
      const listing = await client.allocated(snap);
      expect(listing.capacityBytes).toBe(8 * MiB);
      const extents = [];
      for await (const e of listing) extents.push(e);
      expect(extents).toEqual([]);
    } finally {
      await client.close();
    }
  });

  it('cbt-csi metadata and backup', async () => {
    const listed = await runCli(['metadata', 'allocated', snap, '--endpoint', endpoint, '--json']);
    expect(listed.code, listed.stderr).toBe(0);
    expect(jsonOf<{ capacityBytes: number }>(listed).capacityBytes).toBe(8 * MiB);
    const backup = await runCli([
      'backup',
      '--repo',
      path.join(t.dir, 'repo'),
      '--snapshot',
      snap,
      '--source',
      path.join(t.dir, 'zeros.img'),
      '--endpoint',
      endpoint,
      '--json',
      '--quiet',
    ]);
    expect(backup.code, backup.stderr).toBe(0);
    expect(jsonOf<{ kind: string; snapshot: string }>(backup)).toMatchObject({ kind: 'full', snapshot: snap });
  });
});
