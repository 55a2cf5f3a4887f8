/**
 * A copy of deploy/ in a temporary directory, without any locally generated serving certificate,
 * with a fresh one made by the project's own script: what an installer would have.
 */
import { execFile } from 'node:child_process';
import { cp, mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { ROOT } from './server.ts';

const run = promisify(execFile);

/** Returns the work directory holding `deploy/`; the caller removes it. */
export async function deployCopyWithServingCert(prefix: string): Promise<string> {
  const work = await mkdtemp(join(tmpdir(), prefix));
  const generated = join(ROOT, 'deploy', 'overlays', 'kubernetes', 'serving-cert');
  await cp(join(ROOT, 'deploy'), join(work, 'deploy'), {
    recursive: true,
    filter: (src) => !(src.startsWith(join(generated, 'pki')) || src === join(generated, 'apiservice-cabundle.yaml')),
  });
  await run('bash', [join(work, 'deploy', 'scripts', 'make-serving-cert.sh')]);
  return work;
}
