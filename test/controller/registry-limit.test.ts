import t from 'tap';
import { perRegistryLimit } from '../../src/controller/registry-limit.ts';
import type { ImageStage, ImageStageInput, StageOutcome } from '../../src/engine/types.ts';

t.test('at most N validations per registry at once; other registries are not held up', async (t) => {
  const active = new Map<string, number>();
  const peak = new Map<string, number>();
  const inner: ImageStage = {
    async run(input: ImageStageInput): Promise<StageOutcome> {
      const host = input.image.split('/')[0]!;
      active.set(host, (active.get(host) ?? 0) + 1);
      peak.set(host, Math.max(peak.get(host) ?? 0, active.get(host)!));
      await new Promise((r) => setTimeout(r, 20));
      active.set(host, active.get(host)! - 1);
      return { status: 'True', reason: 'ok', code: 'Verified' };
    },
  };
  const limited = perRegistryLimit(inner, 2);
  const input = (host: string, i: number): ImageStageInput => ({
    image: `${host}/x/m${i}:v1`,
    moduleName: 'm',
    dirName: '/opt',
    kernel: '6.1.0-1-amd64',
    access: {},
    platform: { os: 'linux', architecture: 'amd64' },
  });
  await Promise.all([
    ...Array.from({ length: 10 }, (_, i) => limited.run(input('a.example.com', i))),
    ...Array.from({ length: 4 }, (_, i) => limited.run(input('b.example.com:5000', i))),
  ]);
  t.equal(peak.get('a.example.com'), 2);
  t.equal(peak.get('b.example.com:5000'), 2);
});
