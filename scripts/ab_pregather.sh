python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD MOEBENCH_GIT_COMMIT=$(cat .gitcommit 2>/dev/null)
mkdir -p /root/.cache/moebench && cp results/triton_dev/v7_ab_tune.json /root/.cache/moebench/triton_tune.json
P=mixtral-layer,coarse-32x2-layer,olmoe-layer,deepseek-fine-layer,fine-128x8-layer,mid-64x4-layer
for t in 1 0 1; do
  echo "######## PREGATHER=$t"
  MOEBENCH_TRITON_PREGATHER=$t python3 benchmarks/profile_layer.py --presets $P --backends triton:100 --top 9 --tag _pg$t$([ -f $OUT/profile_layer_pg$t.json ] && echo b) 2>&1 | grep -v Warning
done
python3 benchmarks/profile_layer.py --presets $P --backends grouped_mm --top 3 --tag _gmm 2>&1 | grep -v Warning
cp /root/.cache/moebench/triton_tune.json $OUT/tune.json
