/** Acceptance: no acknowledged write lost to kill -9, and 10,000 module statuses, on etcd. */
import t from 'tap';
import { startEtcd, type TestEtcd } from '../helpers/etcd.ts';
import { durabilityAcceptance } from './durability-acceptance.ts';

let etcd: TestEtcd | undefined;
t.teardown(async () => {
  await etcd?.stop();
});
durabilityAcceptance(t, async () => {
  etcd = await startEtcd();
  return ['--storage', 'etcd', '--etcd-servers', etcd.url];
});
