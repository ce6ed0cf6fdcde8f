/** Volumes and snapshots for backup tests, through a real driver's Controller and Node services. */
import fs from 'node:fs';
import { blockCap, directRead, type NodeEnv } from '../../e2e/support/node-env.js';

export interface Published {
  volumeId: string;
  device: string;
  release(): Promise<void>;
}

let counter = 0;

export async function createVolume(env: NodeEnv, capacity: number, snapshotId?: string): Promise<string> {
  const res = await env.controller.call('createVolume', {
    name: `test-${process.pid}-${++counter}`,
    capacityRange: { requiredBytes: BigInt(capacity) },
    volumeCapabilities: [blockCap()],
    parameters: { blockSize: '4096' },
    ...(snapshotId ? { volumeContentSource: { type: { case: 'snapshot' as const, value: { snapshotId } } } } : {}),
  });
  return res.volume!.volumeId;
}

/** Stages and publishes a volume as a block device, as kubelet would. */
export async function publish(env: NodeEnv, volumeId: string): Promise<Published> {
  const name = `p${++counter}`;
  const staging = env.path('staging', name);
  const device = env.path('pods', name);
  fs.mkdirSync(staging, { recursive: true });
  fs.mkdirSync(env.path('pods'), { recursive: true });
  await env.node.call('nodeStageVolume', { volumeId, stagingTargetPath: staging, volumeCapability: blockCap() });
  await env.node.call('nodePublishVolume', {
    volumeId,
    stagingTargetPath: staging,
    targetPath: device,
    volumeCapability: blockCap(),
  });
  return {
    volumeId,
    device,
    async release() {
      await env.node.call('nodeUnpublishVolume', { volumeId, targetPath: device });
      await env.node.call('nodeUnstageVolume', { volumeId, stagingTargetPath: staging });
    },
  };
}

export async function snapshot(env: NodeEnv, volumeId: string): Promise<string> {
  return (
    await env.controller.call('createSnapshot', { sourceVolumeId: volumeId, name: `snap-${process.pid}-${++counter}` })
  ).snapshot!.snapshotId;
}

/** A snapshot's bytes, read through the device of a volume created from it (then deleted). */
export async function snapshotBytes(env: NodeEnv, snapshotId: string, capacity: number): Promise<Buffer> {
  const volumeId = await createVolume(env, capacity, snapshotId);
  const p = await publish(env, volumeId);
  try {
    return directRead(p.device, capacity, env.path('scratch-read'));
  } finally {
    await p.release();
    await env.controller.call('deleteVolume', { volumeId });
  }
}

/** Every directory under `root` is 0700 and every file 0600; returns the paths that are not. */
export function looserThanPrivate(root: string): string[] {
  const out: string[] = [];
  const walk = (d: string) => {
    for (const name of fs.readdirSync(d)) {
      const p = `${d}/${name}`;
      const st = fs.lstatSync(p);
      if (st.isDirectory()) {
        if ((st.mode & 0o777) !== 0o700) out.push(`${p} ${(st.mode & 0o777).toString(8)}`);
        walk(p);
      } else if ((st.mode & 0o777) !== 0o600) out.push(`${p} ${(st.mode & 0o777).toString(8)}`);
    }
  };
  if ((fs.statSync(root).mode & 0o777) !== 0o700) out.push(`${root} ${(fs.statSync(root).mode & 0o777).toString(8)}`);
  walk(root);
  return out;
}
