/**
 * Holds a repository's writer lock from another process, as a second backup would: prints "locked" once it
 * holds it (or "busy: …" when it cannot take it), then holds it until its stdin closes.
 */
import { BackupRepository } from '../../../src/backup/repository.js';

const repo = await BackupRepository.open(process.argv[2]!);
try {
  const lock = await repo.lock();
  process.stdout.write('locked\n');
  process.stdin.resume();
  process.stdin.on('end', () => {
    void lock.release().then(() => process.exit(0));
  });
} catch (err) {
  process.stdout.write(`busy: ${(err as Error).message}\n`);
  process.exit(0);
}
