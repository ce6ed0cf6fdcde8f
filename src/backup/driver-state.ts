/**
 * The driver's state directory is no place for a repository or a restored image: a restore onto a layer
 * file would overwrite a volume's blocks, and a file made among the store's would be found by its recovery.
 * A store is a directory holding `store.lock` and `catalog.db` (storage-engine/), the state directory the
 * one holding `store/`; both are recognised on every ancestor of the path, after symlinks are resolved.
 */
import fs from 'node:fs';
import path from 'node:path';

/** The driver state directory `p` lies in (or is), or undefined. `p` need not exist. */
export async function driverStateAround(p: string): Promise<string | undefined> {
  // The nearest ancestor that exists, resolved: a symlink leads nowhere around the check.
  let at = path.resolve(p);
  let real: string | undefined;
  for (;;) {
    real = await fs.promises.realpath(at).catch(() => undefined);
    if (real !== undefined || path.dirname(at) === at) break;
    at = path.dirname(at);
  }
  for (let d = real ?? at; ; d = path.dirname(d)) {
    if (isStore(d)) return path.dirname(d);
    if (isStore(path.join(d, 'store'))) return d;
    if (path.dirname(d) === d) return undefined;
  }
}

function isStore(dir: string): boolean {
  return fs.existsSync(path.join(dir, 'store.lock')) && fs.existsSync(path.join(dir, 'catalog.db'));
}
