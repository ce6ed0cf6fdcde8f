/**
 * Whether an unmounted ext4 or xfs image needs its journal replayed before it reads as a consistent
 * filesystem, by the filesystems' own tools: ext4 marks it with the needs_recovery feature (dumpe2fs -h);
 * xfs_db refuses to walk an image whose log holds changes not yet written home.
 */
import { spawnSync } from 'node:child_process';

export function needsJournalReplay(device: string, fsType: 'ext4' | 'xfs'): boolean {
  if (fsType === 'ext4') {
    const r = spawnSync('dumpe2fs', ['-h', device], { encoding: 'utf8' });
    const features = /^Filesystem features:\s+(.*)$/m.exec(r.stdout)?.[1];
    if (r.status !== 0 || features === undefined) throw new Error(`dumpe2fs -h ${device}: ${r.stderr}`);
    return features.split(/\s+/).includes('needs_recovery');
  }
  const r = spawnSync('xfs_db', ['-r', '-c', 'blockget', device], { encoding: 'utf8' });
  if (/log which needs to\s+be replayed/.test(r.stderr + r.stdout)) return true;
  if (r.status !== 0) throw new Error(`xfs_db -r -c blockget ${device}: ${r.stderr}`);
  return false;
}
