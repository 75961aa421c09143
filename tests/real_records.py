# ruff: noqa: E501  (real records, kept as they are)
"""A few real records of each added benchmark, in its real layout, with where they come from.

Tests write them where ``TIR_DATA_DIR`` would point (``<name>/test.jsonl``, the Qwen2.5-Math
evaluation suite's layout); the full files are never part of the project.
"""

REAL_RECORDS: dict[str, list[dict]] = {}

# AIME 2025 I, problems 1 and 4: evaluation/data/aime25/test.jsonl as kept in zhshgmail/AReaL
# (fields problem, answer, id; the same file is math-ai/aime25 on the hub)
REAL_RECORDS['aime25'] = [{'problem': 'Find the sum of all integer bases $b>9$ for which $17_b$ is a divisor of $97_b.$',
  'answer': 70,
  'id': '0'},
 {'problem': 'Find the number of ordered pairs $(x,y)$, where both $x$ and $y$ are integers '
             'between $-100$ and $100$ inclusive, such that $12x^2-xy-6y^2=0$.',
  'answer': 117,
  'id': '3'}]

# QwenLM/Qwen2.5-Math evaluation/data/minerva_math/test.jsonl, records idx 0 and 1
REAL_RECORDS['minerva_math'] = [{'problem': 'Each of the two Magellan telescopes has a diameter of $6.5 \\mathrm{~m}$. In one '
             'configuration the effective focal length is $72 \\mathrm{~m}$. Find the diameter of '
             'the image of a planet (in $\\mathrm{cm}$ ) at this focus if the angular diameter of '
             'the planet at the time of the observation is $45^{\\prime \\prime}$.',
  'solution': 'Start with:\n'
              '\\[\n'
              's=\\alpha f \\text {, }\n'
              '\\]\n'
              'where $s$ is the diameter of the image, $f$ the focal length, and $\\alpha$ the '
              'angular diameter of the planet. For the values given in the problem:\n'
              '\\[\n'
              's=\\frac{45}{3600} \\frac{\\pi}{180} 7200=\\boxed{1.6} \\mathrm{~cm}\n'
              '\\]',
  'type': 'Introduction to Astronomy (8.282J Spring 2006)',
  'idx': 0},
 {'problem': 'A white dwarf star has an effective temperature, $T_{e}=50,000$ degrees Kelvin, but '
             'its radius, $R_{\\mathrm{WD}}$, is comparable to that of the Earth. Take '
             '$R_{\\mathrm{WD}}=10^{4} \\mathrm{~km}\\left(10^{7} \\mathrm{~m}\\right.$ or '
             '$\\left.10^{9} \\mathrm{~cm}\\right)$. Compute the luminosity (power output) of the '
             'white dwarf. Treat the white dwarf as a blackbody radiator. Give  your answer in '
             'units of ergs per second, to two significant figures.',
  'solution': '\\[\n'
              '\\begin{aligned}\n'
              'L=4 \\pi R^{2} \\sigma T_{e}^{4} &=4 \\pi\\left(10^{9}\\right)^{2}\\left(5.7 '
              '\\times 10^{-5}\\right)(50,000)^{4} \\operatorname{ergs~s}^{-1} \\\\\n'
              'L & \\simeq \\boxed{4.5e33} \\mathrm{ergs} \\mathrm{s}^{-1} \\simeq 1 L_{\\odot}\n'
              '\\end{aligned}\n'
              '\\]',
  'type': 'Introduction to Astronomy (8.282J Spring 2006)',
  'idx': 1}]

# QwenLM/Qwen2.5-Math evaluation/data/olympiadbench/test.jsonl (OlympiadBench OE_TO_maths_en_COMP),
# ids 1929, 2243, 2253, 2317; the long worked solutions are cut to '(omitted)'
REAL_RECORDS['olympiadbench'] = [{'id': 1929,
  'subfield': 'Number Theory',
  'context': None,
  'question': 'Find all pairs $(m, n)$ of positive integers satisfying the equation\n'
              '\n'
              '$$\n'
              '\\left(2^{n}-1\\right)\\left(2^{n}-2\\right)\\left(2^{n}-4\\right) '
              '\\cdots\\left(2^{n}-2^{n-1}\\right)=m !\n'
              '\\tag{1}\n'
              '$$',
  'solution': ['(omitted)'],
  'final_answer': ['$(1,1), (3,2)$'],
  'is_multiple_answer': True,
  'unit': None,
  'answer_type': 'Tuple',
  'error': None},
 {'id': 2243,
  'subfield': 'Algebra',
  'context': None,
  'question': 'Determine, with justification, all values of $k$ for which $y=x^{2}-4$ and '
              '$y=2|x|+k$ do not intersect.',
  'solution': ['(omitted)'],
  'final_answer': ['(-\\infty,-5)'],
  'is_multiple_answer': False,
  'unit': None,
  'answer_type': 'Interval',
  'error': None},
 {'id': 2253,
  'subfield': 'Geometry',
  'context': None,
  'question': 'Serge likes to paddle his raft down the Speed River from point $A$ to point $B$. '
              'The speed of the current in the river is always the same. When Serge paddles, he '
              'always paddles at the same constant speed. On days when he paddles with the '
              'current, it takes him 18 minutes to get from $A$ to $B$. When he does not paddle, '
              'the current carries him from $A$ to $B$ in 30 minutes. If there were no current, '
              'how long would it take him to paddle from $A$ to $B$ ?',
  'solution': ['(omitted)'],
  'final_answer': ['45'],
  'is_multiple_answer': False,
  'unit': 'minute',
  'answer_type': 'Numerical',
  'error': None},
 {'id': 2317,
  'subfield': 'Algebra',
  'context': None,
  'question': 'If $T=x^{2}+\\frac{1}{x^{2}}$, determine the values of $b$ and $c$ so that '
              '$x^{6}+\\frac{1}{x^{6}}=T^{3}+b T+c$ for all non-zero real numbers $x$.',
  'solution': ['(omitted)'],
  'final_answer': ['-3,0'],
  'is_multiple_answer': True,
  'unit': None,
  'answer_type': 'Numerical',
  'error': None}]

# QwenLM/Qwen2.5-Math evaluation/data/college_math/test.jsonl, rows 0, 1 and exercise.3.2.5
REAL_RECORDS['college_math'] = [{'data_source': 'college_math.Beginning_and_Intermediate_Algebra',
  'question_number': 'exercise.0.4.61',
  'question': 'Simplify: $-10-4(n-5)$',
  'answer': '$10-4 n$',
  'license': 'Creative Commons Attribution 3.0 Unported License (CC BY 3.0)',
  'data_topic': 'college_math.algebra'},
 {'data_source': 'college_math.Beginning_and_Intermediate_Algebra',
  'question_number': 'exercise.9.9.7',
  'question': 'Solve the following systems of equation: \n$x y=90$ \n$(x-5)(y+1)=120$',
  'answer': '$(45,2),(-10,-9)$',
  'license': 'Creative Commons Attribution 3.0 Unported License (CC BY 3.0)',
  'data_topic': 'college_math.algebra'},
 {'data_source': 'college_math.Beginning_and_Intermediate_Algebra',
  'question_number': 'exercise.3.2.5',
  'question': 'Solve the compound inequality and give interval notation: $x-6<-13$ or $6 x '
              '\\leqslant-60$',
  'answer': '$x<-7:(-\\infty,-7)$',
  'license': 'Creative Commons Attribution 3.0 Unported License (CC BY 3.0)',
  'data_topic': 'college_math.algebra'}]

# QwenLM/Qwen2.5-Math evaluation/data/asdiv/test.jsonl, idx 29, 174, 223 and 0
REAL_RECORDS['asdiv'] = [{'body': 'Mrs. Hilt has two pennies, two dimes, and two nickels. Jacob has four pennies, one '
          'nickel, and one dime.',
  'question': 'Who has more money?',
  'solution_type': 'Comparison',
  'answer': 'Mrs. Hilt',
  'formula': '2*1  (cent)+2 (dime)*10 (cent/dime) +2 (nickel)*5 (cent/nickel)=32 cents(Mrs. Hilt) '
             '> 4*1 (cent)+1 (nickel)*5 (cent/nickel) +1  (dime)*10 (cent/dime)=19 cents(Jacob)',
  'idx': 29},
 {'body': 'It is 2:00.',
  'question': 'What time will it be in three hours and forty-five minutes?',
  'solution_type': 'Sum',
  'answer': '5:45',
  'formula': '(2 (hour)*60 (min/hour) + 3 (hour)*60 (min/hour) + 45 (min))/60 (min/hour) =5 r45; '
             'hh:mm=5:45',
  'idx': 174},
 {'body': 'Next in their itinerary was the insectarium, home to hundreds of insect species. Penny, '
          'who likes butterflies and ants, took pictures of the different species. She was able to '
          'capture 60 species of butterflies, 15 species of ants and 20 species of other insects.',
  'question': 'How many species of insects did Penny capture?',
  'solution_type': 'Sum',
  'answer': '95 (species of insects)',
  'formula': '60+15+20=95',
  'idx': 223},
 {'body': 'Seven red apples and two green apples are in the basket.',
  'question': 'How many apples are in the basket?',
  'solution_type': 'Addition',
  'answer': '9 (apples)',
  'formula': '7+2=9',
  'idx': 0}]

# reasoning-machines/gsm-hard (hub dataset card: fields input, code, target), rows 0, 1 and 7
# as kept in 1563245379/LatentGrid data/gsm-hard/test.jsonl; the code field is left out
REAL_RECORDS['gsm_hard'] = [{'input': 'Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and '
           'bakes muffins for her friends every day with 4933828. She sells the remainder at the '
           "farmers' market daily for $2 per fresh duck egg. How much in dollars does she make "
           "every day at the farmers' market?",
  'target': -9867630.0},
 {'input': 'A robe takes 2287720 bolts of blue fiber and half that much white fiber.  How many '
           'bolts in total does it take?',
  'target': 3431580.0},
 {'input': 'A new program had 531811 downloads in the first month. The number of downloads in the '
           'second month was three times as many as the downloads in the first month, but then '
           'reduced by 30% in the third month. How many downloads did the program have total over '
           'the three months?',
  'target': 3244047.1}]
