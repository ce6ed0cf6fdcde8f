/**
 * The layer files of a store, <store>/layers/<id>.layer, and their lifecycle: created (and made durable
 * in the directory) before the catalog transaction that names them commits; unlinked only after the
 * transaction that forgets them; files the catalog does not name are removed at open (invariant 5).
 * Files are 0600 and the directory 0700 whatever the umask (invariant 7).
 *
 * One empty file is made ahead, in the background, for the next layer id the catalog will hand out, with its
 * directory entry already durable: a snapshot then creates its new head without a directory fsync of its own,
 * so its only sync is the catalog commit's. Until a transaction names it the spare is an orphan like any other
 * (removed at open); it is always empty, which is exactly what a new layer's file is.
 */
import fs from 'node:fs';
import path from 'node:path';
import { Bitmap } from './bitmap.js';
import { translateIoError } from './errors.js';
import { Layer } from './layer.js';

const LAYER_DIR = 'layers';
const LAYER_FILE = /^(\d+)\.layer$/;
export const FILE_MODE = 0o600;
export const DIR_MODE = 0o700;

/** Makes a directory (and missing parents) and sets its mode exactly, whatever the umask. */
export function makePrivateDir(dir: string): void {
  fs.mkdirSync(dir, { recursive: true, mode: DIR_MODE });
  fs.chmodSync(dir, DIR_MODE);
}

/** Creates a layer row in the catalog; returns its id (the file name follows from it). */
export type InsertLayerRow = (parentId: number | null, blockSize: number) => number;

export class LayerFiles {
  readonly dir: string;
  private readonly pendingUnlinks = new Set<Promise<void>>();
  /** The layer id whose empty file exists with a durable directory entry, made ahead by `prepareSpare`. */
  private spareId: number | undefined;
  private spareWork: Promise<void> = Promise.resolve();

  constructor(
    storeDir: string,
    /** The id the catalog's next layer row will get. */
    private readonly nextLayerId: () => number,
  ) {
    this.dir = path.join(storeDir, LAYER_DIR);
    makePrivateDir(this.dir);
  }

  pathOf(id: number): string {
    return path.join(this.dir, `${id}.layer`);
  }

  /** Whether the file of a catalog layer exists (a missing one means the store is damaged). */
  exists(id: number): boolean {
    return fs.existsSync(this.pathOf(id));
  }

  /**
   * Runs a catalog change that needs new layers. `newLayer` inserts the row and creates its file, whose
   * directory entry is durable before the change returns (and so before the enclosing transaction commits);
   * if the change throws, the files it created go again.
   */
  withNewLayers<T>(
    insertRow: InsertLayerRow,
    change: (newLayer: (parentId: number | null, blockSize: number) => Layer) => T,
  ): T {
    const created: Layer[] = [];
    const newLayer = (parentId: number | null, blockSize: number): Layer => {
      const id = insertRow(parentId, blockSize);
      const file = this.pathOf(id);
      const spare = this.spareId === id;
      this.spareId = undefined;
      if (!spare) {
        try {
          fs.closeSync(fs.openSync(file, 'w', FILE_MODE));
          fs.chmodSync(file, FILE_MODE);
        } catch (err) {
          translateIoError(err, `creating layer ${id}`);
        }
      }
      const layer = new Layer(id, parentId, blockSize, file, new Bitmap(), new Bitmap(), false);
      created.push(layer);
      if (!spare) this.syncDir();
      return layer;
    };
    try {
      return change(newLayer);
    } catch (err) {
      // A rolled-back transaction hands its ids out again: their files go, the spare's included.
      for (const layer of created) fs.rmSync(layer.path, { force: true });
      throw err;
    } finally {
      this.prepareSpare();
    }
  }

  /**
   * Makes the next layer's empty file, and its directory entry durable, in the background. Failures are
   * ignored: the next new layer then makes its file the slow way. Call only after orphans were removed.
   */
  prepareSpare(): void {
    this.spareWork = this.spareWork.then(async () => {
      const id = this.nextLayerId();
      if (this.spareId === id) return;
      this.spareId = undefined;
      const file = this.pathOf(id);
      try {
        // Exclusive: a layer that took this id meanwhile made (and synced) its own file; leave it alone.
        const handle = await fs.promises.open(
          file,
          fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_WRONLY,
          FILE_MODE,
        );
        await handle.chmod(FILE_MODE);
        await handle.close();
        const dir = await fs.promises.open(this.dir, 'r');
        try {
          await dir.sync();
        } finally {
          await dir.close();
        }
        // Only a spare still ahead of the catalog counts: an id handed out meanwhile made its own file.
        if (this.nextLayerId() === id) this.spareId = id;
      } catch {
        this.spareId = undefined;
      }
    });
  }

  /**
   * Drops a layer's file after the catalog no longer names it. The unlink is asynchronous: freeing a large
   * scattered file can take seconds, and nothing may stall the event loop that serves I/O. A crash before it
   * completes leaves an orphan that the next open removes.
   */
  forget(layer: Layer): void {
    layer.close();
    const unlink = fs.promises.rm(layer.path, { force: true }).catch(() => undefined);
    this.pendingUnlinks.add(unlink);
    void unlink.finally(() => this.pendingUnlinks.delete(unlink));
  }

  /** At close: waits for the spare's making and removes it, so a closed store holds only the catalog's files. */
  async dropSpare(): Promise<void> {
    await this.spareWork;
    if (this.spareId === undefined) return;
    await fs.promises.rm(this.pathOf(this.spareId), { force: true });
    this.spareId = undefined;
  }

  /** Resolves when every unlink started so far has finished (space given back, not just scheduled). */
  async settle(): Promise<void> {
    await this.spareWork;
    await Promise.all(this.pendingUnlinks);
  }

  /** Removes every file in the layer directory whose layer the catalog does not know (invariant 5). */
  removeOrphans(known: (id: number) => boolean): void {
    for (const entry of fs.readdirSync(this.dir)) {
      const match = LAYER_FILE.exec(entry);
      if (match && known(Number(match[1]))) {
        // Stores made before files were private may hold readable layer files.
        fs.chmodSync(path.join(this.dir, entry), FILE_MODE);
        continue;
      }
      fs.rmSync(path.join(this.dir, entry), { force: true, recursive: true });
    }
  }

  private syncDir(): void {
    const fd = fs.openSync(this.dir, 'r');
    try {
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
  }
}
