/**
 * Online expansion of a published volume (issue 15 item 7), driven the way csi-resizer and kubelet drive it:
 * ControllerExpandVolume (with the PV's volume_capability) first, then NodeExpandVolume on the node only if
 * the controller answered node_expansion_required (current kubelets skip it otherwise), with the target
 * path as volume_path (and the staging path, as kubelet sends both). The size checked is the one a pod
 * sees: the published device node, and the filesystem mounted at the target.
 */
import fs from 'node:fs';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { MiB, blockCap, dataPlaneSuite, mountCap, sh, startNodeEnv, type NodeEnv } from './support/node-env.js';

const SINGLE_NODE_MULTI_WRITER = 7;
const CAP_SYS_RESOURCE = 24;

/** Online ext4 growth needs CAP_SYS_RESOURCE (node-service.test.ts covers the refusal without it). */
function hasCapability(bit: number): boolean {
  const line = fs
    .readFileSync('/proc/self/status', 'utf8')
    .split('\n')
    .find((l) => l.startsWith('CapEff:'));
  return ((BigInt(`0x${line?.split(/\s+/)[1] ?? '0'}`) >> BigInt(bit)) & 1n) === 1n;
}

let env: NodeEnv;

type Cap = ReturnType<typeof blockCap> | ReturnType<typeof mountCap>;

/** What csi-resizer then kubelet do for an online expansion of a volume published at `target`. */
async function expandLikeKubelet(
  volumeId: string,
  bytes: number,
  cap: Cap,
  target: string,
  staging: string,
): Promise<void> {
  const range = { requiredBytes: BigInt(bytes) };
  const controller = await env.controller.call('controllerExpandVolume', {
    volumeId,
    capacityRange: range,
    volumeCapability: cap,
  });
  expect(controller.capacityBytes).toBe(BigInt(bytes));
  if (!controller.nodeExpansionRequired) return;
  const node = await env.node.call('nodeExpandVolume', {
    volumeId,
    volumePath: target,
    stagingTargetPath: staging,
    capacityRange: range,
    volumeCapability: cap,
  });
  expect(node.capacityBytes).toBe(BigInt(bytes));
}

const deviceBytes = (device: string) => Number(sh('blockdev', ['--getsize64', device]).trim());

dataPlaneSuite('online expansion of a published volume', () => {
  beforeAll(async () => {
    env = await startNodeEnv();
  }, 60_000);
  afterAll(async () => {
    await env?.cleanup();
  }, 60_000);

  it('block: after ControllerExpandVolume then NodeExpandVolume (as kubelet calls them), every published device node, read-only ones included, has the new size', async () => {
    const cap = blockCap(SINGLE_NODE_MULTI_WRITER);
    const volumeId = (
      await env.controller.call('createVolume', {
        name: 'grow-block',
        capacityRange: { requiredBytes: BigInt(64 * MiB) },
        volumeCapabilities: [cap],
      })
    ).volume!.volumeId;
    const staging = env.path('staging', 'grow-block');
    fs.mkdirSync(staging, { recursive: true });
    fs.mkdirSync(env.path('pods'), { recursive: true });
    const rw = env.path('pods', 'grow-block-rw');
    const ro = env.path('pods', 'grow-block-ro');
    await env.node.call('nodeStageVolume', { volumeId, stagingTargetPath: staging, volumeCapability: cap });
    await env.node.call('nodePublishVolume', {
      volumeId,
      stagingTargetPath: staging,
      targetPath: rw,
      volumeCapability: cap,
    });
    await env.node.call('nodePublishVolume', {
      volumeId,
      stagingTargetPath: staging,
      targetPath: ro,
      volumeCapability: cap,
      readonly: true,
    });
    expect([deviceBytes(rw), deviceBytes(ro)]).toEqual([64 * MiB, 64 * MiB]);

    await expandLikeKubelet(volumeId, 96 * MiB, cap, rw, staging);
    expect([deviceBytes(rw), deviceBytes(ro)]).toEqual([96 * MiB, 96 * MiB]);

    for (const t of [rw, ro]) await env.node.call('nodeUnpublishVolume', { volumeId, targetPath: t });
    await env.node.call('nodeUnstageVolume', { volumeId, stagingTargetPath: staging });
  });

  for (const fsType of hasCapability(CAP_SYS_RESOURCE) ? ['ext4', 'xfs'] : ['xfs']) {
    it(`filesystem (${fsType}): after ControllerExpandVolume then NodeExpandVolume (as kubelet calls them), the filesystem at the target has grown`, async () => {
      const cap = mountCap(fsType);
      const volumeId = (
        await env.controller.call('createVolume', {
          name: `grow-${fsType}`,
          capacityRange: { requiredBytes: BigInt(320 * MiB) },
          volumeCapabilities: [cap],
        })
      ).volume!.volumeId;
      const staging = env.path('staging', `grow-${fsType}`);
      fs.mkdirSync(staging, { recursive: true });
      fs.mkdirSync(env.path('pods'), { recursive: true });
      const target = env.path('pods', `grow-${fsType}`);
      await env.node.call('nodeStageVolume', { volumeId, stagingTargetPath: staging, volumeCapability: cap });
      await env.node.call('nodePublishVolume', {
        volumeId,
        stagingTargetPath: staging,
        targetPath: target,
        volumeCapability: cap,
      });
      const before = fs.statfsSync(target);

      await expandLikeKubelet(volumeId, 640 * MiB, cap, target, staging);
      const after = fs.statfsSync(target);
      expect(after.blocks * after.bsize).toBeGreaterThan(before.blocks * before.bsize + 256 * MiB);

      await env.node.call('nodeUnpublishVolume', { volumeId, targetPath: target });
      await env.node.call('nodeUnstageVolume', { volumeId, stagingTargetPath: staging });
    });
  }
});
