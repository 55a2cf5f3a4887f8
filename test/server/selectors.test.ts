import t from 'tap';
import { parseFieldSelector, parseLabelSelector } from '../../src/server/selectors.ts';

t.test('label selectors with every operator', async (t) => {
  const l = { app: 'gpu', tier: 'driver', size: '5' };
  const m = (s: string) => parseLabelSelector(s).matches(l);
  t.ok(m('app=gpu'));
  t.ok(m('app==gpu,tier=driver'));
  t.notOk(m('app!=gpu'));
  t.ok(m('app in (gpu, nic)'));
  t.notOk(m('app notin (gpu)'));
  t.ok(m('tier'));
  t.ok(m('!missing'));
  t.notOk(m('missing'));
  t.ok(m('size>3'));
  t.notOk(m('size<3'));
  t.ok(m('app in (gpu,nic),tier notin (x)'));
  t.ok(parseLabelSelector('').empty);
  t.ok(parseLabelSelector(undefined).matches(undefined));
});

t.test('bad label selectors are a 400', async (t) => {
  for (const bad of ['app in gpu', 'a=b=c', 'bad key=x', 'size>x']) {
    t.throws(() => parseLabelSelector(bad), { code: 400, reason: 'BadRequest' }, bad);
  }
});

t.test('field selectors support metadata.name only, like kube for these kinds', async (t) => {
  const f = parseFieldSelector('metadata.name=a', ['metadata.name', 'metadata.namespace']);
  t.equal(f.exactName, 'a');
  t.ok(f.matches({ 'metadata.name': 'a' }));
  t.notOk(f.matches({ 'metadata.name': 'b' }));
  t.ok(parseFieldSelector('metadata.name!=a', ['metadata.name']).matches({ 'metadata.name': 'b' }));
  t.throws(() => parseFieldSelector('spec.kernelVersion=x', ['metadata.name']), /field label not supported: spec.kernelVersion/);
});
